"""The fused CPU causal conv1d (+ SiLU) against the float64 torch ops (output and the gradients of x, weight
and bias), its dispatch and fallback, and bad arguments.

Errors are max |kernel - reference| / max |reference| per tensor. float64 agrees to 1e-15 (summation order);
float32 over L = 20000 measured 4e-7 (the weight and bias gradients are summed in blocks), so 1e-5.
"""

import pytest
import torch

from mambakit.kernels import cpu_conv
from mambakit.kernels.cpu_conv import causal_conv1d, causal_conv1d_cpu, causal_conv1d_torch
from mambakit.kernels.cpu_scan import kernel_status

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def kernel():
    ok, why = kernel_status(torch.float32)
    if not ok:
        pytest.skip(f"the fused CPU kernel cannot be built here: {why}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(fn, x, w, bias, act, gout):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias) if t is not None]
    y = fn(*leaves[:2], leaves[2] if bias is not None else None, act)
    grads = torch.autograd.grad(y, leaves, gout.to(y.dtype))
    return y, grads


@pytest.mark.parametrize("b,d,L,K", [(2, 5, 37, 4), (1, 3, 1, 4), (3, 9, 8, 2), (2, 16, 100, 1), (1, 8, 7, 7),
                                     (1, 4, 3, 4), (2, 11, 64, 3)])
@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_float64_matches_torch_ops(b, d, L, K, act, with_bias):
    torch.manual_seed(b * 1000 + d * 10 + L + K)
    x, w = torch.randn(b, d, L, dtype=F64), torch.randn(d, 1, K, dtype=F64)
    bias = torch.randn(d, dtype=F64) if with_bias else None
    gout = torch.randn(b, d, L, dtype=F64)
    y, grads = run(causal_conv1d_cpu, x, w, bias, act, gout)
    y_ref, grads_ref = run(causal_conv1d_torch, x, w, bias, act, gout)
    assert y.dtype == F64 and rel(y, y_ref) < 1e-13
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape and rel(g, g_ref) < 1e-13


def test_float32_long_sequence_against_float64():
    torch.manual_seed(0)
    x, w, bias = torch.randn(2, 24, 20000), torch.randn(24, 1, 4), torch.randn(24)
    gout = torch.randn(2, 24, 20000)
    y, grads = run(causal_conv1d_cpu, x, w, bias, "silu", gout)
    y_ref, grads_ref = run(causal_conv1d_torch, *(t.double() for t in (x, w, bias)), "silu", gout.double())
    assert y.dtype == torch.float32 and rel(y, y_ref) < 1e-5
    for g, g_ref, t in zip(grads, grads_ref, (x, w, bias)):
        assert g.dtype == torch.float32 and g.shape == t.shape and rel(g, g_ref) < 1e-5


def test_gradcheck_and_a_2d_weight():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, dtype=F64, requires_grad=True)
    bias = torch.randn(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: causal_conv1d_cpu(*t, activation="silu"), (x, w, bias))


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(2)
    x, w, bias = torch.randn(3, 40, 3000), torch.randn(40, 1, 4), torch.randn(40)
    gout = torch.randn(3, 40, 3000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(causal_conv1d_cpu, x, w, bias, "silu", gout)
        torch.set_num_threads(4)
        four = run(causal_conv1d_cpu, x, w, bias, "silu", gout)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], four[0]) and all(torch.equal(a, c) for a, c in zip(one[1], four[1]))


def test_views_empty_batch_and_lower_precision_inputs():
    torch.manual_seed(3)
    xt = torch.randn(2, 50, 6, dtype=F64).transpose(1, 2)            # (2, 6, 50) non-contiguous view
    w, bias = torch.randn(6, 1, 4, dtype=F64), torch.randn(6, dtype=F64)
    assert rel(causal_conv1d_cpu(xt, w, bias, "silu"), causal_conv1d_torch(xt, w, bias, "silu")) < 1e-13
    x0 = torch.randn(0, 6, 5, dtype=F64, requires_grad=True)
    w0 = w.clone().requires_grad_()
    y0 = causal_conv1d_cpu(x0, w0, None, "silu")
    assert y0.shape == (0, 6, 5)
    y0.sum().backward()
    assert torch.equal(w0.grad, torch.zeros_like(w0))
    xb = torch.randn(1, 6, 30).bfloat16()                             # computed in float32, cast back
    yb = causal_conv1d_cpu(xb, w.float(), bias.float(), "silu")
    assert yb.dtype == torch.bfloat16
    assert rel(yb, causal_conv1d_torch(xb.double(), w, bias, "silu")) < 1e-2


def test_dispatch_falls_back_to_torch_ops(monkeypatch):
    x, w = torch.randn(1, 4, 10), torch.randn(4, 1, 4)
    calls = []
    monkeypatch.setattr(cpu_conv, "causal_conv1d_cpu", lambda *a, **k: calls.append(1) or causal_conv1d_torch(*a))
    causal_conv1d(x, w, None, "silu")
    assert calls == [1]
    causal_conv1d(x, torch.randn(4, 1, 17), None, "silu")              # wider than MAX_KERNEL_SIZE
    causal_conv1d(x.half(), w.half(), None, "silu")                     # a dtype the kernel does not take
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal_conv1d(x, w, None, "silu")
    assert calls == [1]

    def unavailable(*a, **k):
        raise cpu_conv.KernelUnavailable("no compiler")
    monkeypatch.setattr(cpu_conv, "causal_conv1d_cpu", unavailable)
    assert torch.equal(causal_conv1d(x, w, None, "silu"), causal_conv1d_torch(x, w, None, "silu"))


def test_bad_arguments_are_named():
    x, w = torch.randn(1, 4, 10), torch.randn(4, 1, 4)
    with pytest.raises(ValueError, match="activation must be None, 'silu' or 'swish', got 'relu'"):
        causal_conv1d(x, w, None, "relu")
    with pytest.raises(ValueError, match=r"x must be \(batch, dim, length\), got shape \(4, 10\)"):
        causal_conv1d(x[0], w)
    with pytest.raises(ValueError, match=r"weight must be \(4, K\) or \(4, 1, K\).*got \(5, 1, 4\)"):
        causal_conv1d(x, torch.randn(5, 1, 4))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(3,\)"):
        causal_conv1d(x, w, torch.randn(3))
