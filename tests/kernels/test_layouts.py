"""The fused CPU conv and scan on every memory layout and in reverse, against the float64 reference.

The kernels read (b, d, L) tensors through their strides: contiguous channel-major rows, token-major memory
(the transposed view of a (b, L, d) tensor), every other row of such memory (x and z are the two halves of
in_proj's (b, L, 2 d) output), and with `reverse` time walked last to first through a negative stride. Each
layout and direction must give `flip(op(flip(inputs)))`'s values and gradients (float64: 1e-12; float32:
1e-4 relative, as the plain-layout tests), write the output in the input's layout, and hand back gradients in
the layouts of their inputs.
"""

import pytest
import torch

from mambakit.core.layout import is_token_major
from mambakit.kernels.cpu_conv import causal_conv1d_cpu, causal_conv1d_torch
from mambakit.kernels.cpu_scan import kernel_status, selective_scan_cpu, selective_scan_cpu_projected
from mambakit.kernels.reference import selective_scan_ref

F64 = torch.float64
LAYOUTS = ["rows", "token_major", "half_of_pair"]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    ok, why = kernel_status(torch.float32)
    if not ok:
        pytest.skip(f"the fused CPU kernel cannot be built here: {why}")


def laid_out(t: torch.Tensor, layout: str, second: bool = False) -> torch.Tensor:
    """t's values as a (b, d, L) view in `layout`, backed by a leaf (half_of_pair: the first or the second
    half of a (b, L, 2 d) leaf); `leaf_grad(view)` reads that leaf's gradient back in the view's shape."""
    b, d, L = t.shape
    if layout == "rows":
        return t.detach().clone().requires_grad_()
    if layout == "token_major":
        leaf = t.detach().transpose(1, 2).contiguous().requires_grad_()
        view = leaf.transpose(1, 2)
        LEAVES[id(view)] = lambda: leaf.grad.transpose(1, 2)
    else:
        leaf = torch.randn(b, L, 2 * d, dtype=t.dtype)
        half = slice(d, None) if second else slice(None, d)
        leaf[..., half].copy_(t.transpose(1, 2))
        leaf.requires_grad_()
        view = leaf[..., half].transpose(1, 2)
        LEAVES[id(view)] = lambda: leaf.grad[..., half].transpose(1, 2)
    return view


LEAVES = {}                                   # id(view) -> its leaf's gradient in the view's shape


@pytest.fixture(autouse=True)
def fresh_leaves():
    yield
    LEAVES.clear()


def leaf_grad(t):
    return t.grad if t.is_leaf else LEAVES[id(t)]()


def flip_if(t, reverse):
    return t.flip(-1) if reverse and t is not None else t


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("b,d,L,N", [(2, 19, 150, 5), (1, 16, 300, 16), (3, 8, 7, 3)])
def test_scan_layouts_and_reverse_match_the_reference(dtype, layout, reverse, b, d, L, N):
    torch.manual_seed(b * 100 + d + L + N)
    u0, z0 = torch.randn(b, d, L, dtype=dtype), torch.randn(b, d, L, dtype=dtype)
    delta0 = 0.5 * torch.randn(b, d, L, dtype=dtype)
    u, z = laid_out(u0, layout), laid_out(z0, layout, second=True)
    delta = laid_out(delta0, "token_major" if layout != "rows" else "rows")
    A = (-torch.rand(d, N, dtype=dtype) - 0.5).requires_grad_()
    B, C = (torch.randn(b, N, L, dtype=dtype).requires_grad_() for _ in range(2))
    D, bias = (torch.randn(d, dtype=dtype).requires_grad_() for _ in range(2))
    init = torch.randn(b, d, N, dtype=dtype).requires_grad_()
    out, last = selective_scan_cpu(u, delta, A, B, C, D, z, bias, True, True, init, reverse=reverse)
    assert out.shape == (b, d, L) and is_token_major(out) == is_token_major(u)
    gout, glast = torch.randn_like(out), torch.randn_like(last)
    (out * gout).sum().add_((last * glast).sum()).backward()
    grads = [leaf_grad(t) for t in (u, delta, z)] + [t.grad for t in (A, B, C, D, bias, init)]

    ref_in = [t.detach().double().requires_grad_() for t in (u0, delta0, z0, A, B, C, D, bias, init)]
    u_r, delta_r, z_r, A_r, B_r, C_r, D_r, bias_r, init_r = ref_in
    ref, last_ref = selective_scan_ref(flip_if(u_r, reverse), flip_if(delta_r, reverse), A_r, flip_if(B_r, reverse),
                                       flip_if(C_r, reverse), D_r, flip_if(z_r, reverse), bias_r, True, True, init_r)
    ref = flip_if(ref, reverse)
    (ref * gout.double()).sum().add_((last_ref * glast.double()).sum()).backward()
    tol = 1e-12 if dtype == F64 else 1e-4
    assert rel(out, ref) < tol and rel(last, last_ref) < tol
    for name, g, r in zip(("u", "delta", "z", "A", "B", "C", "D", "bias", "init"), grads, ref_in):
        assert rel(g, r.grad) < tol * 10, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_gradients_come_back_in_their_inputs_layouts(layout):
    torch.manual_seed(0)
    b, d, L, N = 2, 16, 40, 4
    u, z = laid_out(torch.randn(b, d, L), layout), laid_out(torch.randn(b, d, L), layout, second=True)
    delta = laid_out(torch.randn(b, d, L), "rows")
    seen = {}
    for name, t in (("u", u), ("delta", delta), ("z", z)):
        t.register_hook(lambda g, name=name: seen.__setitem__(name, g))
    out = selective_scan_cpu(u, delta, -torch.rand(d, N) - 0.5, torch.randn(b, N, L), torch.randn(b, N, L),
                             z=z, delta_softplus=True)
    out.sum().backward()
    assert is_token_major(seen["u"]) == is_token_major(u) and is_token_major(seen["z"]) == is_token_major(z)
    assert seen["delta"].is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_projected_scan_layouts_and_reverse(layout, reverse):
    torch.manual_seed(1)
    b, d, L, N, R = 2, 24, 90, 6, 3
    u0, z0 = torch.randn(b, d, L, dtype=F64), torch.randn(b, d, L, dtype=F64)
    u, z = laid_out(u0, layout).detach(), laid_out(z0, layout, second=True).detach()
    w, rows = torch.randn(d, R, dtype=F64), torch.randn(b, L, R + 2 * N, dtype=F64).transpose(1, 2)
    dt_in, B, C = rows[:, :R], rows[:, R:R + N], rows[:, R + N:]       # views of a token-major x_dbl
    A, D, bias = -torch.rand(d, N, dtype=F64) - 0.5, torch.randn(d, dtype=F64), torch.randn(d, dtype=F64)
    with torch.no_grad():
        out = selective_scan_cpu_projected(u, w, dt_in, A, B, C, D, z, bias, True, reverse=reverse)
        ref = flip_if(selective_scan_ref(*(flip_if(t, reverse) for t in (u0, w @ dt_in)), A,
                                         *(flip_if(t, reverse) for t in (B, C)), D, flip_if(z0, reverse), bias, True),
                      reverse)
    assert rel(out, ref) < 1e-12 and is_token_major(out) == is_token_major(u)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("b,d,L,K", [(2, 21, 300, 4), (1, 16, 5, 4), (3, 8, 600, 2), (1, 40, 257, 3),
                                     (2, 7, 33, 9)])
def test_conv_layouts_and_reverse_match_torch(dtype, layout, reverse, b, d, L, K):
    torch.manual_seed(b + d + L + K)
    x0 = torch.randn(b, d, L, dtype=dtype)
    x = laid_out(x0, layout, second=True)
    w, bias = torch.randn(d, K, dtype=dtype).requires_grad_(), torch.randn(d, dtype=dtype).requires_grad_()
    y = causal_conv1d_cpu(x, w, bias, "silu", reverse=reverse)
    assert is_token_major(y) == is_token_major(x)
    gout = torch.randn(b, d, L, dtype=dtype)
    (y * gout).sum().backward()
    ref_in = [t.detach().double().requires_grad_() for t in (x0, w, bias)]
    ref = causal_conv1d_torch(*ref_in, "silu", reverse=reverse)
    (ref * gout.double()).sum().backward()
    tol = 1e-13 if dtype == F64 else 1e-5
    assert rel(y, ref) < tol
    for g, r in zip((leaf_grad(x), w.grad, bias.grad), ref_in):
        assert rel(g, r.grad) < tol


def test_conv_reverse_is_the_flipped_conv_and_torch_fallback_agrees():
    torch.manual_seed(2)
    x, w = torch.randn(2, 6, 50, dtype=F64), torch.randn(6, 4, dtype=F64)
    expected = causal_conv1d_torch(x.flip(-1), w, None, None).flip(-1)
    for fn in (causal_conv1d_cpu, causal_conv1d_torch):
        torch.testing.assert_close(fn(x, w, None, None, reverse=True), expected, rtol=1e-13, atol=1e-13)
    # anti-causal: the output at t depends on t .. t + K - 1 only
    y = causal_conv1d_cpu(x, w, None, None, reverse=True)
    x2 = x.clone()
    x2[..., :20] = 0
    assert torch.equal(causal_conv1d_cpu(x2, w, None, None, reverse=True)[..., 20:], y[..., 20:])
