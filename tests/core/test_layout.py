"""The channel-major layout of the Mamba-1 mixers.

1. The layout-crossing Linear (`mambakit.core.layout`) against F.linear: values, every gradient, and the memory
   layout of each gradient (the input's own), also under CPU autocast.
2. Mamba, Vim's bimamba v2 (identity + flip, mean), MambaMIL's SR-Mamba (identity + stride-10 with zero padding,
   sum) and the concat / gate merges: forward and the gradients of the input and of every parameter against a
   float64 transcription of the token-major upstream computation (in_proj -> reorder xz -> branch -> restore ->
   merge -> out_proj, with the loop scan of core_refs), with and without per-sample lengths.
3. No layout copy at the scan boundary: a scan backend other than the fused CPU kernel sees contiguous
   channel-major u, delta, z and output gradients; the CPU kernel sees token-major views of in_proj's output
   (x and z) and of the tensors computed from them, and runs a flip order backwards in time instead of
   receiving flipped copies.
"""

import pytest
import torch
import torch.nn.functional as F

import core_refs
from core_refs import randomize
from mambakit.core import Mamba, MultiOrderMamba, StrideOrder
from mambakit.core import scan as scan_module
from mambakit.core.layout import channel_major_linear, is_token_major, token_major_linear
from mambakit.kernels import cpu_scan
from mambakit.kernels.reference import selective_scan_ref

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------
# 1. channel_major_linear / token_major_linear


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("token_major_input", [True, False])
def test_channel_major_linear_matches_linear_with_gradients_in_the_input_layout(b, with_bias, token_major_input):
    torch.manual_seed(0)
    L, n_in, n_out = 7, 5, 6
    W = torch.randn(n_out, n_in, dtype=F64, requires_grad=True)
    bias = torch.randn(n_out, dtype=F64, requires_grad=True) if with_bias else None
    if token_major_input:
        src = torch.randn(b, L, n_in, dtype=F64, requires_grad=True)
        x = src.transpose(1, 2)                                   # a view: the Linear must read it in place
    else:
        src = torch.randn(b, n_in, L, dtype=F64, requires_grad=True)
        x = src
    out = channel_major_linear(x, W, bias)
    ref = F.linear(x.transpose(1, 2), W, bias).transpose(1, 2)
    assert out.shape == (b, n_out, L) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(out)
    wrt = [src, W] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(out, wrt, g)
    grads_ref = torch.autograd.grad(ref, wrt, g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert grads[0].is_contiguous()                               # in src's own layout, without a copy left to do


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_token_major_linear_matches_linear_on_the_transpose(b, with_bias):
    torch.manual_seed(1)
    y = torch.randn(b, 5, 7, dtype=F64, requires_grad=True)      # (b, in, L)
    W = torch.randn(4, 5, dtype=F64, requires_grad=True)
    bias = torch.randn(4, dtype=F64, requires_grad=True) if with_bias else None
    out = token_major_linear(y, W, bias)
    ref = F.linear(y.transpose(1, 2), W, bias)
    assert out.shape == (b, 7, 4) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(out)
    wrt = [y, W] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(out, wrt, g)
    for a, r in zip(grads, torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert grads[0].is_contiguous()                               # channel-major, as y


def test_layout_linears_under_cpu_autocast_and_bad_shapes():
    torch.manual_seed(2)
    h = torch.randn(2, 9, 8, requires_grad=True)
    W, bias = torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channel_major_linear(h.transpose(1, 2), W, bias)
        back = token_major_linear(out, W.t().contiguous())
    assert out.dtype == back.dtype == torch.bfloat16
    back.float().square().sum().backward()
    assert h.grad.dtype == W.grad.dtype == bias.grad.dtype == torch.float32
    exact = F.linear(h, W, bias).transpose(1, 2)
    assert (out.float() - exact).abs().max() < 0.05 * exact.abs().max()
    with pytest.raises(ValueError, match=r"expected \(batch, 8, length\)"):
        channel_major_linear(h, W)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(6,\)"):
        token_major_linear(h.transpose(1, 2), W, torch.randn(5))


# ---------------------------------------------------------------------------------------------------------
# 2. The mixers against the token-major upstream computation


def stride_perm(L, R):
    """MambaMIL's SR order with zero padding: scanned position j reads token perm[j]; None = a zero token."""
    K = -(-L // R)
    return [src if src < L else None for src in ((j % K) * R + j // K for j in range(K * R))]


def perm_of(order, L):
    if order == "identity":
        return list(range(L))
    if order == "flip":
        return list(range(L - 1, -1, -1))
    return stride_perm(L, int(order.split("_")[1]))


def reference(m, h, orders, merge):
    """Upstream's token-major computation in float64 for one unpadded sequence batch h (b, L, d_model)."""
    xz = F.linear(h, m.in_proj.weight, m.in_proj.bias)                                   # (b, L, 2 d_inner)
    if orders is None:                                                                  # plain Mamba
        return F.linear(core_refs.mamba1_branch_of(m, xz), m.out_proj.weight, m.out_proj.bias)
    b, L, _ = xz.shape
    ys = []
    for order, suffix in zip(orders, m.suffixes):
        perm = perm_of(order, L)
        zero = xz.new_zeros(b, xz.shape[-1])
        scanned = torch.stack([xz[:, t] if t is not None else zero for t in perm], dim=1)
        y = core_refs.mamba1_branch_of(m, scanned, suffix)
        ys.append(torch.stack([y[:, perm.index(t)] for t in range(L)], dim=1))        # restore
    if merge in ("sum", "mean"):
        y = sum(ys[1:], ys[0]) / (len(ys) if merge == "mean" else 1)
    elif merge == "concat":
        y = F.linear(torch.cat(ys, -1), m.merge_proj.weight)
    else:
        w = torch.softmax(F.linear(torch.cat(ys, -1), m.merge_gate.weight, m.merge_gate.bias), -1)
        y = sum(w[..., k:k + 1] * ys[k] for k in range(len(ys)))
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


CASES = {
    "mamba": (lambda bias: Mamba(16, d_state=4, bias=bias, dtype=F64), None, None),
    "vim": (lambda bias: MultiOrderMamba.vim(16, d_state=4, bias=bias, dtype=F64), ("identity", "flip"), "mean"),
    "sr": (lambda bias: MultiOrderMamba.sr(16, rate=10, d_state=4, bias=bias, dtype=F64),
           ("identity", "stride_10"), "sum"),
    "concat": (lambda bias: MultiOrderMamba(16, orders=("identity", "flip", StrideOrder(3)), merge="concat",
                                            d_state=4, bias=bias, dtype=F64), ("identity", "flip", "stride_3"),
               "concat"),
    "gate": (lambda bias: MultiOrderMamba(16, orders=("flip", StrideOrder(4)), merge="gate", d_state=4, bias=bias,
                                          dtype=F64), ("flip", "stride_4"), "gate"),
}


def check_grads(m, x, out, ref_loss_fn, g):
    """out (module output) and ref_loss_fn() (the reference's <g, output>) give the same input and parameter
    gradients."""
    names = ["input"] + [n for n, _ in m.named_parameters()]
    wrt = [x, *m.parameters()]
    grads = torch.autograd.grad((out * g).sum(), wrt, allow_unused=True)
    grads_ref = torch.autograd.grad(ref_loss_fn(), wrt, allow_unused=True)
    for name, a, r in zip(names, grads, grads_ref):
        assert (a is None) == (r is None), name
        if a is not None:
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_all_gradients_match_token_major_upstream(case, bias):
    factory, orders, merge = CASES[case]
    torch.manual_seed(3)
    m = randomize(factory(bias))
    x = torch.randn(2, 23, 16, dtype=F64, requires_grad=True)     # 23: the stride-10 order pads 7 zero tokens
    out = m(x)
    ref = reference(m, x, orders, merge)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    check_grads(m, x, out, lambda: (reference(m, x, orders, merge) * g).sum(), g)


@pytest.mark.parametrize("case", ["mamba", "vim", "sr"])
def test_lengths_forward_and_gradients_match_each_sequence_alone(case):
    """Right-padded batch with lengths: outputs and gradients equal the reference run on each valid prefix alone
    (the reverse direction starting at each sequence's own last token, the stride order on its own length)."""
    factory, orders, merge = CASES[case]
    torch.manual_seed(4)
    m = randomize(factory(True))
    lengths = [23, 11, 1, 17]
    x = (30 * torch.randn(4, 23, 16, dtype=F64)).requires_grad_(True)      # loud padding that must not leak
    out = m(x, lengths=torch.tensor(lengths))
    g = torch.randn_like(out)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, :n], reference(m, x[i:i + 1, :n], orders, merge)[0],
                                   rtol=1e-10, atol=1e-12)
        assert torch.all(out[i, n:] == 0)

    def ref_loss():
        return sum((reference(m, x[i:i + 1, :n], orders, merge)[0] * g[i, :n]).sum()
                   for i, n in enumerate(lengths))
    check_grads(m, x, out, ref_loss, g)


# ---------------------------------------------------------------------------------------------------------
# 3. No layout copy at the scan boundary

SEEN: list[tuple[str, bool]] = []


def recording_scan(u, delta, A, B, C, D=None, z=None, **kwargs):
    """The reference scan, noting whether u, delta, z and the output gradient arrive contiguous."""
    SEEN.extend([("u", u.is_contiguous()), ("delta", delta.is_contiguous()), ("z", z.is_contiguous())])
    out = selective_scan_ref(u, delta, A, B, C, D=D, z=z, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    if y.requires_grad:
        y.register_hook(lambda grad: SEEN.append(("dout", grad.is_contiguous())))
    return out


@pytest.fixture
def recording_backend():
    scan_module.register_backend("recording", f"{__name__}:recording_scan")
    SEEN.clear()
    yield "recording"
    scan_module._BACKENDS.pop("recording", None)


@pytest.mark.parametrize("b", [1, 2])
def test_scan_gets_contiguous_channel_major_tensors_and_gradients(recording_backend, b):
    for m in (Mamba(16, d_state=4, scan_backend=recording_backend, dtype=F64),
              MultiOrderMamba.vim(16, d_state=4, scan_backend=recording_backend, dtype=F64),
              MultiOrderMamba.sr(16, rate=4, d_state=4, scan_backend=recording_backend, dtype=F64)):
        SEEN.clear()
        x = torch.randn(b, 10, 16, dtype=F64, requires_grad=True)
        m(x).backward(torch.randn(b, 10, 16, dtype=F64))
        names = [name for name, _ in SEEN]
        assert names.count("dout") == names.count("u") == len(getattr(m, "suffixes", [""]))
        assert all(ok for _, ok in SEEN), (type(m).__name__, SEEN)
        assert x.grad.is_contiguous()


KERNEL_CALLS: list[dict] = []


REAL_PROJECTED = cpu_scan.selective_scan_cpu_projected


def recording_cpu_scan(u, dt_weight, dt_in, A, B, C, D=None, z=None, reverse=False, **kwargs):
    """The fused CPU scan with its delta projection, noting the layouts it is handed and the direction."""
    KERNEL_CALLS.append({"u": u, "z": z, "reverse": reverse})
    return REAL_PROJECTED(u, dt_weight, dt_in, A, B, C, D=D, z=z, reverse=reverse, **kwargs)


@pytest.mark.parametrize("b", [1, 3])
def test_cpu_kernel_gets_token_major_views_and_runs_the_flip_order_in_reverse(monkeypatch, b):
    ok, why = cpu_scan.kernel_status(F64)
    if not ok:
        pytest.skip(f"the fused CPU kernel cannot be built here: {why}")
    monkeypatch.setattr(cpu_scan, "selective_scan_cpu_projected", recording_cpu_scan)
    for m, reverses in ((Mamba(16, d_state=4, dtype=F64), [False]),
                        (MultiOrderMamba.vim(16, d_state=4, dtype=F64), [False, True])):
        for memory_efficient in (False, True):
            m.memory_efficient = memory_efficient
            KERNEL_CALLS.clear()
            x = torch.randn(b, 10, 16, dtype=F64, requires_grad=True)
            m(x).sum().backward()
            assert [c["reverse"] for c in KERNEL_CALLS] == reverses
            xz_storages = set()
            for call in KERNEL_CALLS:
                assert all(is_token_major(call[k]) for k in ("u", "z")), type(m).__name__
                xz_storages.add(call["z"].untyped_storage().data_ptr())
            assert len(xz_storages) == 1                 # z: every branch reads the same in_proj output in place
            assert x.grad.is_contiguous()


def test_cpu_batch_chunk_only_splits_large_cpu_batches():
    from mambakit.core.layout import cpu_batch_chunk
    x = torch.zeros(8, 3)
    assert cpu_batch_chunk(x, 4097) == 2                               # Vim-Ti at 1024 px: two images a part
    assert cpu_batch_chunk(x, 4097, budget=8193) == 1
    assert cpu_batch_chunk(x, 2305) == 3                               # 768 px: three
    assert cpu_batch_chunk(x, 1025) == 8                               # 512 px: fits, one pass
    assert cpu_batch_chunk(x, 20000) == 1                              # at least one sample
    assert cpu_batch_chunk(x[:1], 20000) == 1
    with torch.no_grad():
        assert cpu_batch_chunk(x, 4097) == 2                           # with or without autograd
    assert cpu_batch_chunk(torch.zeros(8, 3, device="meta"), 4097) == 8   # other devices: the whole batch
