"""`Mamba` (Mamba-1): `mamba_ssm.modules.mamba_simple.Mamba`'s arguments, defaults, initialisation and
parameter names, in pure PyTorch on top of `selective_scan`, with variable lengths and recurrent decoding.

Data flow for hidden_states (b, L, d_model), d_inner = expand * d_model. Between in_proj and out_proj the
tensors are (b, channels, L), as in mamba_ssm, and no layout copy is made:

    x, z = in_proj(h)                (b, d_inner, L) each
    x  = silu(causal depthwise conv(x))                      conv1d: (d_inner, 1, d_conv)
    dt | B | C = x_proj.weight @ x   (b, dt_rank | d_state | d_state, L)
    dt = dt_proj.weight @ dt         (b, d_inner, L)         (its bias is the scan's delta_bias, with softplus)
    y  = selective_scan(x, dt, A=-exp(A_log), B, C, D, z)    (b, d_inner, L)
    out = out_proj(y)                (b, L, d_model)

Layout: on the CPU their memory is token-major, (b, L, channels) seen through a transposed view: in_proj is
one (b L, d_model) x (d_model, 2 d_inner) GEMM whose output halves are x and z, and every GEMM after it has the
token count as its row count, which MKL runs ~1.5x faster on these shapes than the channel-major form
(Vim-Ti's in_proj at 768 px on 2 cores: 4.5 ms against 6.6-9.6 ms); the fused conv and scan kernels read and
write token-major memory in place and walk time backwards for the reverse direction of a bidirectional mixer
(`reverse`), so its flips cost nothing. Elsewhere (CUDA) the tensors are contiguous channel-major, one GEMM
per half reading h transposed, as mamba_ssm lays them out. Where the scan is the fused CPU kernel it also
computes dt_proj itself, chunk by chunk, in the forward and again in the backward
(`kernels.cpu_scan.selective_scan_cpu_projected`), so no (b, d_inner, L) delta is written or kept for training.

The pieces shared with the multi-order mixers live in `SelectiveSSM`: the per-order parameter sets
(`conv1d{s}`, `x_proj{s}`, `dt_proj{s}`, `A{s}_log`, `D{s}` for a name suffix s) and the branch computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.core.cache import InferenceParams, states_from_cache
from mambakit.core.layout import channel_major_linear, same_layout_linear, token_major_linear
from mambakit.core.orders import OrderIndices, reorder, restore
from mambakit.core.recompute import SavedActivations, SharedRecompute, backward_source
from mambakit.core.scan import runs_fused_cpu_kernel, selective_scan, selective_state_update
from mambakit.kernels.cpu_conv import causal_conv1d

#: The default of `memory_efficient` (Mamba, MultiOrderMamba): recompute the branch's cheap intermediates in
#: the backward instead of keeping them (see `SelectiveSSM._branch_lean`). Off by default because it is slower
#: on CPU: SR-Mamba(512, rate=10) forward+backward, b=1, one thread, float32: L=10000 +6% (recomputation 0.37 s
#: of 4.3 s, mostly page faults of fresh 40 MB buffers), L=20000 +11% (7.85 s vs 7.04 s, best of 3) for a peak
#: 48.7 instead of 65.0 KiB/token and 16.5 instead of 48.8 KiB/token held between forward and backward.
MEMORY_EFFICIENT = False

__all__ = ["Mamba", "SelectiveSSM", "MEMORY_EFFICIENT", "set_memory_efficient", "init_dt_proj",
           "check_hidden", "check_lengths", "length_mask", "compute_dtype",
           "causal_conv", "conv_step", "last_conv_window"]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Parameters are used in float32 (float64 for a float64 model), as upstream's `.float()` does."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_hidden(owner: str, hidden_states, d_model: int) -> tuple[int, int]:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"{owner}: hidden_states must be a tensor (batch, length, {d_model}), "
                        f"got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != d_model:
        raise ValueError(f"{owner}: hidden_states has shape {tuple(hidden_states.shape)}, "
                         f"expected (batch, length, d_model={d_model})")
    if hidden_states.shape[1] == 0:          # conv1d and the scan have nothing to run on; say so here
        raise ValueError(f"{owner}: hidden_states has length 0 (shape {tuple(hidden_states.shape)}); "
                         f"expected at least one token per sequence")
    return hidden_states.shape[0], hidden_states.shape[1]


def check_lengths(owner: str, lengths, batch: int, seqlen: int, device) -> torch.Tensor | None:
    """Validate per-sample lengths (right padding): an integer tensor (batch,) with values in [0, seqlen]."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"{owner}: lengths must be an integer tensor of shape ({batch},), got dtype "
                         f"{lengths.dtype} and shape {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > seqlen):
        raise ValueError(f"{owner}: lengths must lie in [0, {seqlen}] (the padded length), got "
                         f"min {int(lengths.min())}, max {int(lengths.max())}")
    return lengths.to(device=device, dtype=torch.long)


def length_mask(lengths: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(b,) lengths -> (b, seqlen) bool, True on valid positions."""
    return torch.arange(seqlen, device=lengths.device) < lengths[:, None]


def causal_conv(x: torch.Tensor, conv: nn.Conv1d, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv over (b, c, L); `prefix` (b, c, d_conv-1) holds the inputs before x (zeros if None)."""
    k = conv.kernel_size[0]
    if prefix is None:
        return F.conv1d(x, conv.weight, conv.bias, padding=k - 1, groups=conv.groups)[..., : x.shape[-1]]
    return F.conv1d(torch.cat([prefix.to(x.dtype), x], dim=-1), conv.weight, conv.bias, groups=conv.groups)


def last_conv_window(x: torch.Tensor, conv_state: torch.Tensor | None, lengths: torch.Tensor | None,
                     d_conv: int) -> torch.Tensor:
    """The conv inputs the next step needs: the last d_conv columns of [previous window | x] per sample,
    ending at each sample's own last valid token."""
    b, c, _ = x.shape
    prev = conv_state.to(x.dtype) if conv_state is not None else x.new_zeros(b, c, d_conv)
    full = torch.cat([prev, x], dim=-1)
    if lengths is None:
        return full[..., -d_conv:]
    idx = lengths[:, None] + torch.arange(d_conv, device=x.device)
    return full.gather(2, idx[:, None, :].expand(b, c, d_conv))


def conv_step(conv_state: torch.Tensor, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Shift x (b, c) into the window (b, c, d_conv) in place; return the activated conv output (b, c)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = torch.sum(conv_state * conv.weight[:, 0, :].to(conv_state.dtype), dim=-1)
    if conv.bias is not None:
        out = out + conv.bias
    return F.silu(out).to(x.dtype)


def init_dt_proj(dt_proj: nn.Linear, dt_rank: int, d_inner: int, dt_min: float, dt_max: float, dt_init: str,
                 dt_scale: float, dt_init_floor: float) -> None:
    """mamba_ssm's dt init: weight ~ U(+-dt_rank^-0.5 * dt_scale) (or constant), bias = softplus^-1(dt) with
    dt log-uniform in [dt_min, dt_max] (floored at dt_init_floor). The bias is marked `_no_reinit`."""
    std = dt_rank ** -0.5 * dt_scale
    if dt_init == "constant":
        nn.init.constant_(dt_proj.weight, std)
    elif dt_init == "random":
        nn.init.uniform_(dt_proj.weight, -std, std)
    else:
        raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
    dt = torch.exp(torch.rand(d_inner, device=dt_proj.bias.device) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))     # inverse of softplus
    dt_proj.bias._no_reinit = True


class SelectiveSSM(nn.Module):
    """Shared machinery of the Mamba-1 mixers: arguments, parameter sets and the per-order branch."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 layer_idx: int | None = None, scan_backend: str = "auto",
                 memory_efficient: bool = MEMORY_EFFICIENT, device=None, dtype=None):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"{type(self).__name__}: dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"{type(self).__name__}: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.scan_backend = scan_backend
        if not isinstance(memory_efficient, bool):
            raise TypeError(f"{type(self).__name__}: memory_efficient must be True or False, "
                            f"got {memory_efficient!r}")
        self.memory_efficient = memory_efficient
        self._dt_cfg = dict(dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
                            dt_init_floor=dt_init_floor)
        self._conv_bias = conv_bias
        self._factory = {"device": device, "dtype": dtype}

    # -- parameters -------------------------------------------------------------------------------------
    def _add_ssm_params(self, suffix: str) -> None:
        """conv1d{s}, x_proj{s}, dt_proj{s}, A{s}_log, D{s}: one order's parameters, upstream-initialised."""
        fk, di, device = self._factory, self.d_inner, self._factory["device"]
        setattr(self, f"conv1d{suffix}", nn.Conv1d(di, di, kernel_size=self.d_conv, groups=di,
                                                   padding=self.d_conv - 1, bias=self._conv_bias, **fk))
        setattr(self, f"x_proj{suffix}", nn.Linear(di, self.dt_rank + 2 * self.d_state, bias=False, **fk))
        dt_proj = nn.Linear(self.dt_rank, di, bias=True, **fk)
        init_dt_proj(dt_proj, self.dt_rank, di, **self._dt_cfg)
        setattr(self, f"dt_proj{suffix}", dt_proj)
        # S4D-real: A = -(1, 2, ..., N) for every channel; A_log and D are kept in float32.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device).repeat(di, 1)
        A_log = nn.Parameter(torch.log(A).to(torch.float64 if fk["dtype"] == torch.float64 else torch.float32))
        A_log._no_weight_decay = True
        setattr(self, f"A{suffix}_log", A_log)
        D = nn.Parameter(torch.ones(di, device=device,
                                    dtype=torch.float64 if fk["dtype"] == torch.float64 else torch.float32))
        D._no_weight_decay = True
        setattr(self, f"D{suffix}", D)

    def _params(self, suffix: str):
        return (getattr(self, f"conv1d{suffix}"), getattr(self, f"x_proj{suffix}"), getattr(self, f"dt_proj{suffix}"),
                getattr(self, f"A{suffix}_log"), getattr(self, f"D{suffix}"))

    # -- computation ------------------------------------------------------------------------------------
    def _token_major(self, hidden_states: torch.Tensor) -> bool:
        """Whether the branch runs on token-major memory (see the module docstring): where the scan is the fused
        CPU kernel."""
        return runs_fused_cpu_kernel(self.scan_backend, hidden_states.device)

    def _in_proj(self, hidden_states: torch.Tensor, token_major: bool | None = None):
        """hidden_states (b, L, d_model) -> x, z (b, d_inner, L) (in_proj's two halves): token-major, views of
        one GEMM's (b, L, 2 d_inner) output, or contiguous channel-major (token_major False); by default
        token-major where the scan is the fused CPU kernel (`_token_major`)."""
        w, bias, di = self.in_proj.weight, self.in_proj.bias, self.d_inner
        if self._token_major(hidden_states) if token_major is None else token_major:
            # split, not two slices: its backward concatenates the two gradients in one pass (slicing twice
            # zero-fills and copies a full-size gradient per half, then adds them)
            x, z = F.linear(hidden_states, w, bias).split(di, dim=-1)
            return x.transpose(1, 2), z.transpose(1, 2)
        h = hidden_states.transpose(1, 2)
        return (channel_major_linear(h, w[:di], None if bias is None else bias[:di]),
                channel_major_linear(h, w[di:], None if bias is None else bias[di:]))

    def _out_proj(self, y: torch.Tensor) -> torch.Tensor:
        """y (b, d_inner, L) -> out_proj(y) token-major (b, L, d_model)."""
        return token_major_linear(y, self.out_proj.weight, self.out_proj.bias)

    def _branch(self, x: torch.Tensor, z: torch.Tensor, suffix: str = "", *, conv_state: torch.Tensor | None = None,
                ssm_state: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                return_states: bool = False, reverse: bool = False, accumulate_into: torch.Tensor | None = None):
        """One order's SSM on x, z (b, d_inner, L) in scan order -> gated y (b, d_inner, L) in x's layout.

        conv_state / ssm_state: continue from cached states (None: start from zeros). With return_states,
        also return the new (conv_state (b, d_inner, d_conv), ssm_state (b, d_inner, N)), taken at each
        sample's own last valid token when lengths are given. reverse: scan the tokens last to first
        (`flip(_branch(flip(x), flip(z)))`, without the flips); not with states. accumulate_into: add y into this
        tensor in place and return it (inference only: where the scan is the fused CPU kernel, the kernel adds
        its output as it writes it, so a multi-order mixer sums its orders without a buffer per order).
        """
        if reverse and (conv_state is not None or ssm_state is not None or return_states):
            raise ValueError("SelectiveSSM._branch: a reverse branch does not take or return recurrent states")
        if accumulate_into is not None and return_states:
            raise ValueError("SelectiveSSM._branch: accumulate_into does not go with return_states")
        L = x.shape[-1]
        new_conv_state = last_conv_window(x, conv_state, lengths, self.d_conv) if return_states else None
        prefix = conv_state[..., 1:] if conv_state is not None else None
        _, u = self._conv_silu(x, suffix, prefix, reverse=reverse)
        x_dbl = self._x_dbl(u, suffix)
        if not return_states and ssm_state is None and self._projected_scan(u):
            return self._scan_projected(u, x_dbl, z, suffix, reverse=reverse, accumulate_into=accumulate_into)
        dt = self._dt(x_dbl, suffix)
        delta_bias, softplus = None, True
        if return_states and lengths is not None:
            # dt = 0 past a sample's end leaves its state untouched, so the last state is its own.
            _, _, dt_proj, A_log, _ = self._params(suffix)
            dt = F.softplus(dt.to(compute_dtype(A_log)) + dt_proj.bias.to(compute_dtype(A_log))[:, None])
            dt = dt * length_mask(lengths, L)[:, None, :]
            softplus = False
        out = self._scan(u, dt, x_dbl, z, suffix, delta_softplus=softplus, with_bias=softplus,
                         return_last_state=return_states, initial_state=ssm_state, reverse=reverse)
        if accumulate_into is not None:
            return accumulate_into.add_(out)
        if return_states:
            y, last = out
            return y, (new_conv_state, last)
        return out

    # The branch in steps, shared by the plain and the memory-efficient path (which must repeat them exactly).
    def _conv_silu(self, x: torch.Tensor, suffix: str, prefix: torch.Tensor | None = None, reverse: bool = False):
        """x (b, d_inner, L) -> (conv output or None, silu of it). From the start of a sequence, the fused
        conv + silu (kernels.cpu_conv on CPU) gives only the silu and keeps just x for its backward."""
        conv = getattr(self, f"conv1d{suffix}")
        if prefix is None:
            return None, causal_conv1d(x, conv.weight, conv.bias, activation="silu", reverse=reverse)
        c = causal_conv(x, conv, prefix)
        return c, F.silu(c)

    def _x_dbl(self, u: torch.Tensor, suffix: str) -> torch.Tensor:
        """(b, dt_rank + 2 N, L): dt | B | C, in u's layout"""
        return same_layout_linear(u, getattr(self, f"x_proj{suffix}").weight)

    def _dt(self, x_dbl: torch.Tensor, suffix: str) -> torch.Tensor:
        """dt_proj.weight @ dt (b, d_inner, L) in x_dbl's layout, without the bias (the scan's delta_bias)."""
        return same_layout_linear(x_dbl[:, : self.dt_rank], getattr(self, f"dt_proj{suffix}").weight)

    def _scan(self, u, dt, x_dbl, z, suffix: str, delta_softplus: bool = True, with_bias: bool = True,
              return_last_state: bool = False, initial_state=None, reverse: bool = False):
        _, _, dt_proj, A_log, D = self._params(suffix)
        # B and C are views of x_dbl (contiguous for b = 1; the scan kernels take them as they are)
        _, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        ct = compute_dtype(A_log)
        return selective_scan(u, dt, -torch.exp(A_log.to(ct)), B, C, D.to(ct), z=z,
                              delta_bias=dt_proj.bias.to(ct) if with_bias else None, delta_softplus=delta_softplus,
                              return_last_state=return_last_state, initial_state=initial_state,
                              backend=self.scan_backend, reverse=reverse)

    def _projected_scan(self, u: torch.Tensor) -> bool:
        """Whether the fused CPU kernel computes delta = dt_proj(dt) itself, in the forward and again in the
        backward: on the CPU with the kernel backend, where materialising delta is a memory-bound GEMM (~10% of
        a Vim-Ti forward at 1024 px) and, in training, a (b, d_inner, L) tensor kept for the backward."""
        return runs_fused_cpu_kernel(self.scan_backend, u.device)

    def _scan_projected(self, u, x_dbl, z, suffix: str, reverse: bool = False,
                        accumulate_into: torch.Tensor | None = None) -> torch.Tensor:
        from mambakit.kernels.cpu_scan import selective_scan_cpu_projected

        _, _, dt_proj, A_log, D = self._params(suffix)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        ct = compute_dtype(A_log)
        return selective_scan_cpu_projected(u, dt_proj.weight.to(ct), dt, -torch.exp(A_log.to(ct)), B, C, D.to(ct),
                                            z=z, delta_bias=dt_proj.bias.to(ct), delta_softplus=True,
                                            reverse=reverse, accumulate_into=accumulate_into)

    def _records_grad(self, x: torch.Tensor) -> bool:
        """Whether autograd records this forward: a backward can follow."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _lean(self, x: torch.Tensor) -> bool:
        """Whether to take the memory-efficient path: asked for, and a backward can follow."""
        return self.memory_efficient and self._records_grad(x)

    def _in_proj_source(self, hidden_states: torch.Tensor, token_major: bool | None = None) -> SharedRecompute:
        """in_proj's x, z as the memory-efficient branches recompute them in the backward: from hidden_states,
        which in_proj's own backward keeps anyway (or which an enclosing `output_recomputed` recomputes), so
        the (b, L, 2 d_inner) in_proj output is not held between forward and backward."""
        hidden = backward_source(hidden_states)
        return SharedRecompute(lambda: self._in_proj(hidden(), token_major))

    def _branch_lean(self, x: torch.Tensor, z: torch.Tensor, source: SharedRecompute, suffix: str = "",
                     idx: OrderIndices | None = None, reverse: bool = False):
        """`restore(_branch(reorder(x), reorder(z)))` from token-order x, z (b, d_inner, L), keeping between
        forward and backward only x_dbl and what the scan keeps besides its inputs (its state checkpoints):
        x and z themselves, the reordered x and z, the conv output, its silu and delta (where the kernel does not
        project it itself) are recomputed in the backward, x and z from `source` (`_in_proj_source`, shared by
        the orders of a multi-order mixer), the rest from them (see `mambakit.core.recompute`). reverse: as in
        `_branch`, instead of a flip order."""
        acts = SavedActivations()
        with torch.autograd.graph.saved_tensors_hooks(acts.pack, acts.unpack):
            xr, zr = (t if idx is None else reorder(t, idx, dim=-1) for t in (x, z))
            c, u = self._conv_silu(xr, suffix, reverse=reverse)
            x_dbl = self._x_dbl(u, suffix)
            if self._projected_scan(u):
                dt, y = None, self._scan_projected(u, x_dbl, zr, suffix, reverse=reverse)
            else:
                dt = self._dt(x_dbl, suffix)
                y = self._scan(u, dt, x_dbl, zr, suffix, reverse=reverse)
            if idx is not None:
                y = restore(y, idx, dim=-1)

        conv, _, dt_proj, _, _ = self._params(suffix)

        def recompute(name: str) -> dict[str, torch.Tensor]:
            # each piece when the backward first needs it: the scan's u, delta, z, then the conv's input
            if name == "dt":
                return {"dt": self._dt(x_dbl, suffix)}
            x, z = source.get()
            if name in ("xr", "zr"):
                t = x if name == "xr" else z
                return {name: t if idx is None else reorder(t, idx, dim=-1)}
            c, u = self._conv_silu(x if idx is None else reorder(x, idx, dim=-1), suffix, reverse=reverse)
            return {"u": u} if c is None else {"c": c, "u": u}

        inputs = (x_dbl, conv.weight, dt_proj.weight) + ((conv.bias,) if conv.bias is not None else ())
        named = {"xr": xr, "zr": zr, "c": c, "u": u, "dt": dt}
        acts.release({k: v for k, v in named.items() if v is not None}, recompute, inputs=inputs,
                     on_done=source.user())
        return y

    def _branch_step(self, x: torch.Tensor, z: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                     suffix: str = "") -> torch.Tensor:
        """One token: x, z (b, d_inner) -> gated y (b, d_inner); updates the states in place."""
        conv, x_proj, dt_proj, A_log, D = self._params(suffix)
        x = conv_step(conv_state, x, conv)
        dt, B, C = torch.split(F.linear(x, x_proj.weight), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight)
        ct = compute_dtype(A_log)
        backend = self.scan_backend if self.scan_backend in ("auto", "reference") else "auto"
        return selective_state_update(ssm_state, x, dt, -torch.exp(A_log.to(ct)), B, C, D.to(ct), z=z,
                                      dt_bias=dt_proj.bias.to(ct), dt_softplus=True, backend=backend)

    def _allocate(self, batch_size: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.conv1d
        device = conv.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=conv.weight.dtype if dtype is None else dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=self.dt_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state


def set_memory_efficient(model: nn.Module, enabled: bool = True) -> int:
    """Set `memory_efficient` on every Mamba-1 mixer (Mamba, MultiOrderMamba) inside `model`; returns how many.

    For models whose builders do not pass the argument through (e.g. an app's MambaMIL or Vim)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_memory_efficient: enabled must be True or False, got {enabled!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, SelectiveSSM):
            module.memory_efficient = enabled
            count += 1
    return count


class Mamba(SelectiveSSM):
    """The Mamba-1 mixer (causal). hidden_states (b, L, d_model) -> (b, L, d_model).

    Arguments and defaults are mamba_ssm's (d_state=16, d_conv=4, expand=2, dt_rank="auto"=ceil(d_model/16),
    dt_min=0.001, dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
    bias=False); `use_fast_path` is accepted for config compatibility and has no effect. `scan_backend`
    goes to `selective_scan` ("auto", "reference", "cpu", "triton").

    memory_efficient: in training, keep between forward and backward only the small x_dbl and the scan's
    state checkpoints besides the mixer's input (which in_proj's backward keeps anyway), and recompute
    in_proj's x, z, conv1d + silu and delta in the backward (mamba_ssm's `mamba_inner_fn` does the same but
    keeps x, z): 8 bytes x d_inner per token (x, z) plus 12 per token and order (20 for a reordered order)
    less held in float32, the same values, one in_proj GEMM and a few elementwise passes more in the
    backward. Default off (`MEMORY_EFFICIENT`); `set_memory_efficient(model)` switches every such mixer of a
    built model.

    forward(hidden_states, inference_params=None, lengths=None):
      lengths (b,): right-padded batches; outputs past a sample's length are zero and valid outputs equal
        the sample run alone.
      inference_params: prefill (seqlen_offset == 0) caches the states under layer_idx; later calls
        (seqlen_offset > 0) continue from them: one token goes through `step()`, several continue the scan.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: int | None = None, scan_backend: str = "auto",
                 memory_efficient: bool = MEMORY_EFFICIENT, device=None, dtype=None):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale,
                         dt_init_floor, conv_bias, bias, layer_idx, scan_backend, memory_efficient, device, dtype)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, device=device, dtype=dtype)
        self._add_ssm_params("")
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor, inference_params: InferenceParams | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, L = check_hidden("Mamba", hidden_states, self.d_model)
        lengths = check_lengths("Mamba", lengths, b, L, hidden_states.device)
        if inference_params is None:
            x, z = self._in_proj(hidden_states)
            y = self._branch_lean(x, z, self._in_proj_source(hidden_states)) if self._lean(x) else self._branch(x, z)
        else:
            conv_state, ssm_state = states_from_cache(self, inference_params, b, self._allocate)
            continuing = inference_params.seqlen_offset > 0
            if continuing and L == 1 and lengths is None:
                return self.step(hidden_states, conv_state, ssm_state)[0]
            y, (new_conv, new_ssm) = self._branch(
                *self._in_proj(hidden_states), conv_state=conv_state if continuing else None,
                ssm_state=ssm_state if continuing else None, lengths=lengths, return_states=True)
            conv_state.copy_(new_conv)
            ssm_state.copy_(new_ssm)
        out = self._out_proj(y)
        if lengths is not None:
            out = out.masked_fill(~length_mask(lengths, L)[..., None], 0.0)
        return out

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One token per sequence: hidden_states (b, 1, d_model) -> (out (b, 1, d_model), conv_state, ssm_state),
        the states (from `allocate_inference_cache`) updated in place."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or hidden_states.shape[2] != self.d_model:
            raise ValueError(f"Mamba.step: hidden_states has shape {tuple(hidden_states.shape)}, expected "
                             f"(batch, 1, {self.d_model}): one token at a time")
        b = hidden_states.shape[0]
        for name, t, shape in (("conv_state", conv_state, (b, self.d_inner, self.d_conv)),
                               ("ssm_state", ssm_state, (b, self.d_inner, self.d_state))):
            if tuple(t.shape) != shape:
                raise ValueError(f"Mamba.step: {name} has shape {tuple(t.shape)}, expected {shape}")
        x, z = self.in_proj(hidden_states[:, 0]).chunk(2, dim=-1)
        y = self._branch_step(x, z, conv_state, ssm_state)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """(conv_state (b, d_inner, d_conv), ssm_state (b, d_inner, d_state)), zero-filled."""
        return self._allocate(batch_size, dtype)
