"""The memory-efficient training path of the Mamba-1 mixers (`memory_efficient=True`): the same forward values
and gradients as the plain path (Mamba, Vim's bimamba v2, SR-Mamba with padding, concat and gate merges,
lengths; float64 and float32; the fused CPU kernel and the reference scan), and, between forward and backward,
none of the branch's (b, d_inner, L) intermediates held, in_proj's output x, z included: only out_proj's input."""

import weakref

import pytest
import torch

from core_refs import randomize
from mambakit.core import Mamba, MultiOrderMamba, set_memory_efficient
from mambakit.core import recompute

F64, F32 = torch.float64, torch.float32
D_MODEL, D_INNER = 16, 32


BUILDERS = {
    "mamba": lambda **kw: Mamba(D_MODEL, **kw),
    "vim_mean": lambda **kw: MultiOrderMamba.vim(D_MODEL, **kw),
    "sr_pad_sum": lambda **kw: MultiOrderMamba.sr(D_MODEL, rate=3, **kw),
    "concat": lambda **kw: MultiOrderMamba(D_MODEL, orders=("identity", "flip", "stride_3"), merge="concat", **kw),
    "gate": lambda **kw: MultiOrderMamba(D_MODEL, orders=("identity", "stride_4"), merge="gate", **kw),
}


def pair(kind, dtype, backend="auto", seed=0):
    """A plain and a memory-efficient mixer with the same parameters."""
    torch.manual_seed(seed)
    plain = randomize(BUILDERS[kind](d_state=4, dtype=dtype, scan_backend=backend))
    lean = BUILDERS[kind](d_state=4, dtype=dtype, scan_backend=backend, memory_efficient=True)
    lean.load_state_dict(plain.state_dict())
    assert not plain.memory_efficient and lean.memory_efficient
    return plain, lean


def run(m, h, lengths=None):
    h = h.detach().clone().requires_grad_(True)
    out = m(h) if lengths is None else m(h, lengths=lengths)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    return out.detach(), h.grad, {n: p.grad for n, p in m.named_parameters()}


def assert_same(plain, lean, h, lengths=None, rtol=None, atol=None):
    out_p, dh_p, grads_p = run(plain, h, lengths)
    out_l, dh_l, grads_l = run(lean, h, lengths)
    assert torch.equal(out_p, out_l)                            # the same operations on the same inputs
    torch.testing.assert_close(dh_l, dh_p, rtol=rtol, atol=atol)
    assert grads_p.keys() == grads_l.keys()
    for name in grads_p:
        assert grads_p[name] is not None and grads_l[name] is not None, name
        torch.testing.assert_close(grads_l[name], grads_p[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_same_values_and_gradients_float64(kind, backend):
    plain, lean = pair(kind, F64, backend)
    h = torch.randn(2, 23, D_MODEL, dtype=F64)
    assert_same(plain, lean, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_same_values_and_gradients_float32(kind):
    plain, lean = pair(kind, F32)
    h = torch.randn(2, 37, D_MODEL)
    assert_same(plain, lean, h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kind", ["mamba", "sr_pad_sum", "gate"])
def test_lengths(kind, backend):
    plain, lean = pair(kind, F64, backend)
    h = torch.randn(3, 17, D_MODEL, dtype=F64)
    assert_same(plain, lean, h, lengths=torch.tensor([17, 9, 4]), rtol=1e-10, atol=1e-12)


class _Recorder:
    """Every tensor saved for the backward, by the mixer outside its branches and by each branch."""

    def __init__(self, monkeypatch):
        self.outer = recompute.SavedActivations()
        self.branches = []
        real_init = recompute.SavedActivations.__init__
        branches = self.branches

        def init(acts):
            real_init(acts)
            branches.append(acts)

        monkeypatch.setattr(recompute.SavedActivations, "__init__", init)

    def forward(self, m, h):
        with torch.autograd.graph.saved_tensors_hooks(self.outer.pack, self.outer.unpack):
            return m(h)

    def big_storages(self, numel: int) -> dict:
        """The held storages of at least `numel` elements: {address: bytes}."""
        held = self.outer.held() + [t for acts in self.branches for t in acts.held()]
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held
                if t.untyped_storage().nbytes() >= numel * t.element_size()}


@pytest.mark.parametrize("kind", ["mamba", "vim_mean", "sr_pad_sum"])
def test_only_out_proj_input_is_held(kind, monkeypatch):
    """Between forward and backward, the lean path holds one (b, d_inner, L) tensor's worth of memory whatever
    the number of orders: the merged y (out_proj's input). in_proj's output x, z is recomputed from the mixer's
    input (which in_proj's backward keeps anyway), once per backward for all orders, and freed after the last
    order's backward; the plain path holds every branch's intermediates."""
    plain, lean = pair(kind, F32)
    b, L = 2, 40
    h = torch.randn(b, L, D_MODEL, requires_grad=True)
    rec = _Recorder(monkeypatch)
    sources = []
    real_source = type(lean)._in_proj_source
    monkeypatch.setattr(type(lean), "_in_proj_source", lambda m, *a: sources.append(real_source(m, *a)) or sources[-1])
    out = rec.forward(lean, h)
    K = len(getattr(lean, "orders", [None]))
    # dropped per branch: at least silu's output u, saved by x_proj and by the scan (the fused conv + silu saves
    # only its input, which is x itself or the dropped reordered x; the fused scan projects delta itself)
    assert len(rec.branches) == K and all(acts.dropped >= 2 for acts in rec.branches)
    unit = b * D_INNER * L * 4
    assert sum(rec.big_storages(b * D_INNER * L).values()) == unit
    held_input = [t for t in rec.outer.held() if t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()]
    assert held_input                                           # in_proj's input, which x, z come back from

    in_proj_calls = []
    real_in_proj = type(lean)._in_proj
    monkeypatch.setattr(type(lean), "_in_proj", lambda m, *a: in_proj_calls.append(1) or real_in_proj(m, *a))
    out.sum().backward(retain_graph=True)                       # the dropped tensors come back for the backward
    assert len(in_proj_calls) == 1                              # x, z recomputed once, shared by the orders
    assert all(not acts._cache for acts in rec.branches)        # and none is kept after its last use,
    assert len(sources) == 1 and not sources[0].held            # x, z freed after the last order's
    out.sum().backward()                                        # a second backward recomputes them again
    assert len(in_proj_calls) == 2 and not sources[0].held

    rec_plain = _Recorder(monkeypatch)
    rec_plain.forward(plain, h)
    # x, z + u per order (the fused CPU kernel projects delta itself, so no delta is held on either path)
    assert sum(rec_plain.big_storages(b * D_INNER * L).values()) >= (3 + K) * unit


def test_retain_graph_backward_twice_and_no_grad():
    plain, lean = pair("sr_pad_sum", F64)
    h = torch.randn(2, 19, D_MODEL, dtype=F64, requires_grad=True)
    out = lean(h)
    out.sum().backward(retain_graph=True)
    first = h.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(h.grad, 2 * first, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(lean(h), plain(h))


def test_under_activation_checkpointing():
    plain, lean = pair("sr_pad_sum", F64)
    h = torch.randn(2, 19, D_MODEL, dtype=F64, requires_grad=True)
    out_p = plain(h)
    g_p = torch.autograd.grad(out_p.sum(), [h, *plain.parameters()])
    out_l = torch.utils.checkpoint.checkpoint(lean, h, use_reentrant=False)
    g_l = torch.autograd.grad(out_l.sum(), [h, *lean.parameters()])
    assert torch.equal(out_p, out_l)
    for a, b in zip(g_l, g_p):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_parameter_changed_before_backward_is_an_error():
    _, lean = pair("vim_mean", F64)
    out = lean(torch.randn(1, 9, D_MODEL, dtype=F64))
    with torch.no_grad():
        lean.conv1d_b.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
        out.sum().backward()


def test_set_memory_efficient_and_bad_flag():
    model = torch.nn.Sequential(Mamba(8), torch.nn.Linear(8, 8), MultiOrderMamba.sr(8))
    assert set_memory_efficient(model) == 2
    assert model[0].memory_efficient and model[2].memory_efficient
    assert set_memory_efficient(model, False) == 2 and not model[2].memory_efficient
    with pytest.raises(TypeError, match="memory_efficient must be True or False"):
        Mamba(8, memory_efficient="yes")
    with pytest.raises(TypeError, match="enabled must be True or False"):
        set_memory_efficient(model, 1)


@pytest.mark.parametrize("name", ["x_proj_b.weight", "D_b", "out_proj.weight"])
def test_any_saved_tensor_changed_before_backward_is_an_error(name):
    _, lean = pair("vim_mean", F64)
    out = lean(torch.randn(1, 9, D_MODEL, dtype=F64))
    with torch.no_grad():
        lean.get_parameter(name).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _interpreted_triton_scan() -> str:
    """The module name of the interpreted Triton scan (runs on CPU tensors); see tests/triton_interpreted.py."""
    pytest.importorskip("triton")
    from triton_interpreted import MODULE_NAME, load_interpreted_triton_scan
    load_interpreted_triton_scan()
    return MODULE_NAME


@pytest.mark.parametrize("kind", ["mamba", "sr_pad_sum"])
def test_triton_scan_function_interpreted(kind, monkeypatch):
    """The Triton backend's autograd Function (interpreted on CPU) under the memory-efficient path."""
    from mambakit.core import scan
    monkeypatch.setitem(scan._BACKENDS, "triton_interpreted", _interpreted_triton_scan() + ":selective_scan_triton")
    plain, lean = pair(kind, F64, backend="triton_interpreted")
    h = torch.randn(1, 10, D_MODEL, dtype=F64)
    assert_same(plain, lean, h, rtol=1e-10, atol=1e-12)
    rec = _Recorder(monkeypatch)
    rec.forward(lean, h.requires_grad_(True))
    assert rec.branches and all(acts.dropped >= 5 for acts in rec.branches)   # its u, delta, z are not held


def test_autocast_forward_backward_outside_it():
    """Trained under CPU autocast (bfloat16 GEMMs), the backward run outside the autocast context: the
    recomputation replays the forward's autocast state, so it gives the plain path's gradients."""
    plain, lean = pair("sr_pad_sum", F32)
    h = torch.randn(2, 21, D_MODEL)
    results = []
    for m in (plain, lean):
        x = h.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        out.float().sum().backward()
        results.append((out.detach(), x.grad, [p.grad for p in m.parameters()]))
    (out_p, dx_p, g_p), (out_l, dx_l, g_l) = results
    assert torch.equal(out_p, out_l)
    torch.testing.assert_close(dx_l, dx_p, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_l, g_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# The norm in front of a memory-efficient mixer (core Block, MambaMIL's layers)

def test_output_recomputed_gives_the_same_values_and_gradients_and_does_not_keep_the_norm_output():
    torch.manual_seed(0)
    norm, lin = torch.nn.LayerNorm(8, dtype=F64), torch.nn.Linear(8, 5, dtype=F64)
    x = torch.randn(3, 7, 8, dtype=F64, requires_grad=True)
    g = torch.randn(3, 7, 5, dtype=F64)
    plain = lin(norm(x))
    want = torch.autograd.grad((plain * g).sum(), [x, *norm.parameters(), *lin.parameters()])

    seen = []

    def consumer(y):
        seen.append(weakref.ref(y))
        return lin(y)
    out = recompute.output_recomputed(norm, x, consumer, tuple(norm.parameters()))
    assert seen[0]() is None                  # Linear saved norm(x) for its weight gradient; it was dropped
    got = torch.autograd.grad((out * g).sum(), [x, *norm.parameters(), *lin.parameters()])
    assert torch.equal(out, plain)
    for a, b in zip(got, want):
        assert torch.equal(a, b)              # norm(x) recomputed by the same op: the same bits


def test_output_recomputed_refuses_an_input_modified_in_place():
    norm, lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 5)
    x = torch.randn(2, 4, 8, requires_grad=True)
    h = x * 1.0
    out = recompute.output_recomputed(norm, h, lin, tuple(norm.parameters()))
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
        out.sum().backward()


def test_kept_tensors_are_freed_when_their_op_has_run_its_backward():
    """After `release`, what is kept is held by the graph alone: exp's saved output is gone once exp's backward
    has run, while a dropped tensor of the same forward is still to be recomputed (it used to stay until the
    whole forward's backward was over)."""
    x = torch.randn(1000, dtype=F64, requires_grad=True)
    alive = []

    def forward():
        acts = recompute.SavedActivations()
        with torch.autograd.graph.saved_tensors_hooks(acts.pack, acts.unpack):
            scaled = x * 3.0
            a = scaled.sin()                  # saves `scaled`: dropped, recomputed later
            k = a.exp()                       # saves its output k: kept
        acts.release({"scaled": scaled}, lambda name: {"scaled": x * 3.0}, inputs=(x,))
        a.register_hook(lambda grad: alive.append(kref() is not None))    # between exp's and sin's backward
        kref = weakref.ref(k)
        return (k * 2.0).sum()
    out = forward()
    out.backward()
    assert alive == [False]
    torch.testing.assert_close(x.grad, 2.0 * torch.exp(torch.sin(3.0 * x)) * torch.cos(3.0 * x) * 3.0)


@pytest.mark.parametrize("kind", ["vim_mean", "sr_pad_sum"])
def test_block_with_a_memory_efficient_mixer_recomputes_its_norm(kind):
    """core Block (Add -> norm -> mixer): with a memory-efficient mixer the norm's output is not kept either;
    values equal, gradients equal to the plain block's (float64)."""
    from mambakit.core import Block
    plain_mixer, lean_mixer = pair(kind, F64)
    blocks = [Block(D_MODEL, lambda d, m=m: m, norm_cls=lambda d: torch.nn.LayerNorm(d, dtype=F64))
              for m in (plain_mixer, lean_mixer)]
    blocks[1].norm.load_state_dict(blocks[0].norm.state_dict())
    h = torch.randn(2, 23, D_MODEL, dtype=F64)
    r = torch.randn(2, 23, D_MODEL, dtype=F64)
    results = []
    for block in blocks:
        hh, rr = h.clone().requires_grad_(), r.clone().requires_grad_()
        out, res = block(hh, rr)
        g = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
        ((out * g).sum() + res.sum()).backward()
        results.append((out.detach(), hh.grad, rr.grad, [p.grad for p in block.parameters()]))
    (o_p, dh_p, dr_p, gp_p), (o_l, dh_l, dr_l, gp_l) = results
    assert torch.equal(o_p, o_l)
    for a, b in zip([dh_l, dr_l, *gp_l], [dh_p, dr_p, *gp_p]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert blocks[1]._recomputes_norm(r.requires_grad_()) and not blocks[0]._recomputes_norm(r)


def test_block_recomputes_its_norm_once_for_in_proj_and_the_branches(monkeypatch):
    """The branches recompute x, z from the norm's output before in_proj's backward asks for it: the norm runs
    once in the forward and once in the backward, and no (b, L, d_model) copy of its output is held in between."""
    from mambakit.core import Block
    _, lean_mixer = pair("sr_pad_sum", F64)
    block = Block(D_MODEL, lambda d: lean_mixer, norm_cls=lambda d: torch.nn.LayerNorm(d, dtype=F64))
    calls, outputs = [], []
    block.norm.register_forward_hook(lambda m, args, out: calls.append(1) or outputs.append(weakref.ref(out)))
    h = torch.randn(2, 23, D_MODEL, dtype=F64, requires_grad=True)
    out, _ = block(h)
    assert len(calls) == 1 and outputs[0]() is None
    out.sum().backward()
    assert len(calls) == 2 and outputs[1]() is None


def test_mixer_input_modified_in_place_before_backward_is_an_error():
    _, lean = pair("vim_mean", F64)
    x = torch.randn(2, 11, D_MODEL, dtype=F64, requires_grad=True)
    h = x * 1.0
    out = lean(h)
    with torch.no_grad():
        h.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
        out.sum().backward()


def test_block_norm_recompute_under_checkpointing_and_autocast():
    """Inside non-reentrant activation checkpointing (nested saved-tensor hooks) and under CPU bf16 autocast
    (the recomputed norm runs in the forward's autocast state): gradients equal to the plain block's."""
    from mambakit.core import Block
    torch.manual_seed(0)

    def block(memory_efficient, dtype):
        return Block(D_MODEL, lambda d: MultiOrderMamba.vim(D_MODEL, d_state=4, dtype=dtype,
                                                            memory_efficient=memory_efficient),
                     norm_cls=lambda d: torch.nn.LayerNorm(d, dtype=dtype))
    plain, lean = block(False, F64), block(True, F64)
    lean.load_state_dict(plain.state_dict())
    h = torch.randn(2, 19, D_MODEL, dtype=F64, requires_grad=True)
    r = torch.randn(2, 19, D_MODEL, dtype=F64, requires_grad=True)
    o_p, r_p = plain(h, r)
    want = torch.autograd.grad(o_p.sum() + r_p.sum(), [h, r, *plain.parameters()])
    o_l, r_l = torch.utils.checkpoint.checkpoint(lean, h, r, use_reentrant=False)
    got = torch.autograd.grad(o_l.sum() + r_l.sum(), [h, r, *lean.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    plain, lean = block(False, F32), block(True, F32)
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 19, D_MODEL, requires_grad=True)
    grads = []
    for m in (plain, lean):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = m(x)
        grads.append(torch.autograd.grad(out.float().sum(), [x, *m.parameters()]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
