"""The CUDA parity check shared by tests/*/test_*_cuda.py: a module run in float32 on the GPU (Triton scans,
channel-major layout, cuDNN) against the same module in float64 on the CPU (the fused kernel, validated against
the float64 reference by tests/kernels), forward and backward, on fresh random inputs.

The GPU tests skip without CUDA. `MAMBAKIT_CUDA_TESTS_ON_CPU=1` runs them with the "GPU" side on the CPU
(float32 against float64) so that the checks themselves can be exercised on a machine without a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn


def cuda_or_skip() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("MAMBAKIT_CUDA_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (set MAMBAKIT_CUDA_TESTS_ON_CPU=1 to exercise these checks on the CPU)")


def _to(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_pass(module: nn.Module, args: tuple, cotangent: torch.Tensor, grad_inputs: bool):
    """Forward, then backward of <out, cotangent>: (output, {param name: grad}, [input grads])."""
    leaves = [a.detach().clone().requires_grad_(True) if grad_inputs and isinstance(a, torch.Tensor)
              and a.is_floating_point() else a for a in args]
    out = _first_tensor(module(*leaves))
    module.zero_grad(set_to_none=True)
    (out * cotangent.to(out)).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    input_grads = [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    return out.detach(), grads, input_grads


def _assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                         floor: float = 1e-30) -> None:
    """|actual - expected| <= rtol * max(max|expected|, floor) elementwise: errors relative to the tensor's
    scale (floored for gradients that are zero in exact arithmetic, such as a bias in front of a softmax)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values on the GPU"
    scale = max(expected.abs().max().item(), floor)
    err = (actual.double().cpu() - expected).abs().max().item() / scale
    assert err <= rtol, f"{what}: max error {err:.2e} of the tensor's scale (allowed {rtol:.0e})"


def assert_cuda_matches_cpu_float64(module: nn.Module, args: tuple, *, rtol: float = 2e-4,
                                    grad_inputs: bool = True, device: torch.device | None = None) -> None:
    """`module` (any dtype, on the CPU) run as a float64 CPU copy and as a float32 copy on `device`: outputs,
    every parameter's gradient and the floating inputs' gradients agree to `rtol` of each tensor's scale.
    Both copies run in eval mode (no dropout), with TF32 off so that float32 means float32."""
    device = device or cuda_or_skip()
    ref = copy.deepcopy(module).double().eval()
    gpu = copy.deepcopy(module).float().to(device).eval()
    torch.manual_seed(1234)
    with torch.no_grad():
        probe = _first_tensor(ref(*_to(args, "cpu", torch.float64)))
    cotangent = torch.randn(probe.shape, dtype=torch.float64)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out_ref, grads_ref, inputs_ref = run_pass(ref, _to(args, "cpu", torch.float64), cotangent, grad_inputs)
        out, grads, inputs = run_pass(gpu, _to(args, device, torch.float32), cotangent, grad_inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert out.device.type == device.type
    _assert_scaled_close(out, out_ref, rtol, "output")
    assert grads.keys() == grads_ref.keys(), sorted(set(grads) ^ set(grads_ref))
    largest = max((g.abs().max().item() for g in grads_ref.values()), default=0.0)
    for name in grads_ref:
        _assert_scaled_close(grads[name], grads_ref[name], rtol * 10, f"gradient of {name}", floor=1e-4 * largest)
    for i, (g, g_ref) in enumerate(zip(inputs, inputs_ref)):
        _assert_scaled_close(g, g_ref, rtol * 10, f"gradient of input {i}")
