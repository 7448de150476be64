"""Memory-lean training of a Mamba-1 branch: keep what is cheap, recompute the rest in the backward pass.

mamba_ssm's `mamba_inner_fn` keeps, between forward and backward, only the branch input xz, the small x_dbl
(dt_rank + 2 d_state rows) and the scan's state checkpoints, and recomputes conv1d + silu and the delta
projection in its backward before the scan's backward runs. The (b, d_inner, L) intermediates (the reordered
x and z, the conv output, its silu, delta) are therefore never held between the passes; each of them costs
4 bytes x d_inner per token and per order in float32. Here xz itself is not held either: it is recomputed
from the mixer's input, which in_proj's backward keeps anyway (`SharedRecompute`, once per backward for
all the orders of a multi-order mixer), and a pre-norm block's norm output is recomputed from the block's
input (`output_recomputed`, which hands it to the mixer through `backward_source`).

`SavedActivations` does the same for any scan backend, without duplicating kernel code: the branch's forward
runs under `torch.autograd.graph.saved_tensors_hooks`, so every tensor an op saves for its backward (the
conv's input, silu's input, the x_proj GEMM's input, the scan Function's u / delta / z, ...) is first wrapped.
When the forward is done, `release(recomputable)` drops the wrapped tensors that live in the memory of one of
the named intermediates, keeping only where in that memory they sit. In the backward, a dropped wrapper
that is unpacked calls `recompute(name)`, which redoes that part of the branch's cheap work (reorder,
conv1d + silu, dt_proj) from the recomputed x, z and the kept x_dbl, in the forward's autocast state, and is
served a view of the recomputed memory at the same offset, sizes and strides. A recomputed tensor is kept
until its last use in this backward and no longer: the scan's backward sees u, delta, z and the conv output
(computed with u), while the conv's input is recomputed only when the conv's backward asks for it, so the
backward's peak holds no more of them than it needs at a time. The scan's own autograd
Function therefore runs its own backward unchanged (the fused CPU kernel and the Triton kernel from their
state checkpoints, the reference through autograd); its forward is not run again.

Values are those of the plain path: the recomputation repeats the same operations on the same inputs, so
the saved tensors are reproduced exactly (the same kernels in the same order), and the gradients equal
those of the plain path.

Tensors kept: whatever the ops save that is not one of the named intermediates (weights, x_dbl and its views,
the scan's checkpoints, the gather indices, a dtype-converted copy a backend makes for itself, ...) plus
the recomputation's inputs. An input of the recomputation modified in place between forward and backward is
an error, as autograd's own version check makes it for saved tensors.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Callable

import torch

__all__ = ["SavedActivations", "SharedRecompute", "output_recomputed", "backward_source"]

# (tensor, getter) pairs of the enclosing `output_recomputed` calls: a consumer that recomputes from its input
# gets that input back in the backward through the getter instead of holding it (see `backward_source`).
_RECOMPUTED_INPUTS: contextvars.ContextVar[tuple] = contextvars.ContextVar("recomputed_inputs", default=())


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return t.device, storage.data_ptr()


def _autocast_state(device: torch.device):
    kind = device.type
    if kind not in ("cpu", "cuda"):
        return None
    try:
        return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):
        return None


class _Saved:
    """One tensor an op saved for its backward: held, or (after `release`) a place in a recomputed tensor."""

    __slots__ = ("tensor", "version", "name", "view", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.version = tensor._version
        self.name = None
        self.view = None


class SavedActivations:
    """Saved-tensor hooks that drop chosen intermediates after the forward and recompute them in the backward.

        acts = SavedActivations()
        with torch.autograd.graph.saved_tensors_hooks(acts.pack, acts.unpack):
            ...forward ops...
        acts.release({"u": u, "delta": delta}, recompute, inputs=(x, weight))

    `recompute(name)` must return a dict holding `name` (and, optionally, other names it computed on the way),
    computed by the same operations from `inputs` (and anything else it closes over that is not modified in
    place); it runs in the forward's autocast state and in the grad mode of the backward that asks
    (create_graph=True recomputes with history).
    """

    def __init__(self):
        self._packed: list[_Saved] = []          # until `release`; then weak references to the kept ones
        self._released = False
        self._recompute: Callable[[], dict[str, torch.Tensor]] | None = None
        self._autocast = None
        self._inputs: tuple[tuple[torch.Tensor, int], ...] = ()
        self._cache: dict[str, torch.Tensor] = {}
        self._uses: dict[str, int] = {}          # name -> how many dropped saves live in it
        self._pending: dict[str, int] = {}       # name -> uses left in the current backward
        self._dropped = 0
        self._on_done: Callable[[], None] | None = None

    # -- hooks --------------------------------------------------------------------------------------------
    def pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor)
        if not self._released:
            self._packed.append(saved)
        return saved

    def unpack(self, saved: _Saved) -> torch.Tensor:
        if saved.tensor is not None:
            # autograd does not check the version of a tensor saved through hooks; as it does without them:
            if saved.tensor._version != saved.version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a tensor of shape {tuple(saved.tensor.shape)} saved by the memory-efficient "
                    f"Mamba branch is at version {saved.tensor._version}, expected {saved.version}")
            return saved.tensor
        name = saved.name
        if name not in self._cache:
            for other, t in self._run_recompute(name).items():  # also what it computed on the way, if still needed
                if other == name or (self._pending.get(other, 0) > 0 and other not in self._cache):
                    self._cache[other] = t
        base = self._cache[name]
        size, stride, offset = saved.view
        out = base if (tuple(base.shape) == size and base.stride() == stride
                       and base.storage_offset() == offset) else base.as_strided(size, stride, offset)
        self._pending[name] = self._pending.get(name, 0) - 1
        if self._pending[name] <= 0:               # its last use in this backward: free it
            self._cache.pop(name, None)
        if all(n <= 0 for n in self._pending.values()):
            self._cache.clear()
            self._pending = dict(self._uses)       # a further backward (retain_graph) starts over
            if self._on_done is not None:
                self._on_done()
        return out

    def value(self, name: str) -> torch.Tensor:
        """A dropped intermediate in the backward, for a recomputation elsewhere that starts from it: the cached
        one, or recomputed (and cached until this object's own last use of it, if one is still to come)."""
        if name in self._cache:
            return self._cache[name]
        computed = self._run_recompute(name)
        for other, t in computed.items():
            if self._pending.get(other, 0) > 0 and other not in self._cache:
                self._cache[other] = t
        return computed[name]

    # -- after the forward ----------------------------------------------------------------------------------
    def release(self, recomputable: dict[str, torch.Tensor], recompute: Callable[[str], dict[str, torch.Tensor]],
                inputs: tuple[torch.Tensor, ...] = (), on_done: Callable[[], None] | None = None) -> None:
        """Drop every saved tensor that lives in the memory of one of `recomputable` (same dtype). `on_done` is
        called each time a backward has served every dropped tensor (a `SharedRecompute`'s `done`)."""
        by_storage = {}
        for name, t in recomputable.items():
            key = _storage_key(t)
            if key is not None:
                by_storage[key] = (name, t.dtype, t.untyped_storage().nbytes())
        if self._released:
            raise RuntimeError("SavedActivations.release: called twice")
        for saved in self._packed:
            t = saved.tensor
            hit = by_storage.get(_storage_key(t)) if isinstance(t, torch.Tensor) else None
            if hit is None or hit[1] != t.dtype or t.untyped_storage().nbytes() != hit[2]:
                continue
            saved.name, saved.view = hit[0], (tuple(t.shape), t.stride(), t.storage_offset())
            saved.tensor = None
            self._dropped += 1
            self._uses[hit[0]] = self._uses.get(hit[0], 0) + 1
        self._pending = dict(self._uses)
        # What stays held is held by the graph alone: a saved tensor is freed when its op's backward has run,
        # as without hooks, not when the last recomputed one is used.
        self._packed = [weakref.ref(saved) for saved in self._packed if saved.tensor is not None]
        self._released = True
        self._recompute = recompute
        self._on_done = on_done
        self._inputs = tuple((t, t._version) for t in inputs)
        first = next(iter(recomputable.values()), None)
        self._autocast = _autocast_state(first.device) if first is not None else None

    def held(self) -> list[torch.Tensor]:
        """The tensors held for the backward: before `release` every saved tensor, after it the kept ones whose
        op has not run its backward yet, and the recomputation's inputs."""
        saved = self._packed if not self._released else [ref() for ref in self._packed]
        return [s.tensor for s in saved if s is not None and s.tensor is not None] + [t for t, _ in self._inputs]

    @property
    def dropped(self) -> int:
        """How many saved tensors `release` dropped (each is recomputed when the backward asks for it)."""
        return self._dropped

    def _run_recompute(self, name: str) -> dict[str, torch.Tensor]:
        for t, version in self._inputs:
            if t._version != version:
                raise RuntimeError(
                    "memory-efficient Mamba branch: a tensor it recomputes its activations from (the branch's "
                    f"input x / z, x_dbl or a parameter, shape {tuple(t.shape)}) was modified in place between "
                    f"the forward and the backward (version {version} -> {t._version}); modify it after the "
                    "backward, or use memory_efficient=False")
        if self._autocast is None:
            return self._recompute(name)
        kind, enabled, dtype = self._autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            return self._recompute(name)


class SharedRecompute:
    """A value several `SavedActivations` recompute their dropped tensors from (a mixer's in_proj output x, z,
    from which each order's branch recomputes its reordered x, z and conv output): computed once, when the
    first of them needs it in the backward, and kept until the last of them has served every dropped tensor.
    Each user registers with `user()` and passes the callback it returns as `release(..., on_done=...)`; a
    further backward (retain_graph) recomputes it again."""

    def __init__(self, compute: Callable[[], object]):
        self._compute = compute
        self._value = None
        self._users = 0
        self._left = 0

    def user(self) -> Callable[[], None]:
        self._users += 1
        self._left += 1
        return self._done

    def get(self):
        if self._value is None:
            self._value = self._compute()
        return self._value

    def _done(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._value = None
            self._left = self._users

    @property
    def held(self) -> bool:
        """Whether the value is in memory now."""
        return self._value is not None


def backward_source(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """How a recomputation in the backward gets `t`, the input of the forward it repeats: from the enclosing
    `output_recomputed` when t is the tensor it passes to its consumer (a block's normalised input; so t is not
    held twice: that call drops it and recomputes it), else t itself, held, and an error if it was modified in place."""
    for tensor, getter in _RECOMPUTED_INPUTS.get():
        if tensor is t:
            return getter
    version = t._version

    def held() -> torch.Tensor:
        if t._version != version:
            raise RuntimeError(
                "memory-efficient Mamba branch: its input hidden_states (shape "
                f"{tuple(t.shape)}) was modified in place between the forward and the backward (version "
                f"{version} -> {t._version}); modify it after the backward, or use memory_efficient=False")
        return t
    return held


def output_recomputed(producer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      consumer: Callable[[torch.Tensor], torch.Tensor], params: tuple[torch.Tensor, ...] = ()):
    """consumer(producer(x)), keeping producer(x) out of what the backward holds.

    A pre-norm block's norm keeps its input x for its own backward, and the first op of the consumer (a mixer's
    in_proj) keeps its input norm(x) for the weight gradient: two tensors of x's size for one. Likewise a
    Linear keeps its input and the activation after it keeps the Linear's output (MambaMIL's input layer).
    Here the consumer's saved copies of producer(x) are dropped after the forward and producer(x) is
    recomputed, when the consumer's backward first asks for it, from x (held by the producer anyway) and
    `params` (the producer's weights): the same op on the same input, so the same values and gradients. The
    consumer's own memory-efficient paths nest inside (their saved tensors go to their own hooks) and get
    producer(x) back through `backward_source`. x modified in place before the backward is an error."""
    acts = SavedActivations()
    with torch.autograd.graph.saved_tensors_hooks(acts.pack, acts.unpack):
        produced = producer(x)
        token = _RECOMPUTED_INPUTS.set(_RECOMPUTED_INPUTS.get() + ((produced, lambda: acts.value("produced")),))
        try:
            out = consumer(produced)
        finally:
            _RECOMPUTED_INPUTS.reset(token)
    acts.release({"produced": produced}, lambda name: {"produced": producer(x)}, inputs=(x, *params))
    return out
