"""`ssd_scan` and `ssd_state_update`: the entry points to the Mamba-2 (SSD) scan, in `mamba_chunk_scan_combined`'s
layout.

x, z: (b, L, h, p); dt, dt_multiplier: (b, L, h); A, dt_bias: (h,); B, C: (b, L, g, n) with g dividing h;
D: (h,) or (h, p); initial_states: (b, h, p, n). Per head, with dt = clamp(softplus(dt * dt_multiplier +
dt_bias), dt_limit) (each part optional; `dt_multiplier` is TiM4Rec's time-aware mask, applied to the raw dt
before dt_bias and softplus):

    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,    y_t = S_t C_t + D x_t,    out_t = y_t * silu(z_t)

Backends:
- "reference": the sequential loop (`mambakit.kernels.reference.ssd_scan_ref`);
- "chunked": the chunked state-space-duality algorithm in PyTorch (`mambakit.kernels.ssd.ssd_chunked`), any
  device;
- "cpu" / "triton": Mamba-2 computed as the Mamba-1 selective scan over h*p channels
  (`mambakit.kernels.ssd.ssd_via_selective_scan`) by the fused CPU kernel (CPU tensors) or the Triton kernel
  (CUDA tensors), through `mambakit.core.scan.selective_scan`;
- "auto": "chunked" on every device (no dedicated Triton SSD kernel yet).
Inputs are validated here, once.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch

__all__ = ["ssd_scan", "ssd_state_update", "check_ssd_inputs", "available_ssd_backends"]

_BACKENDS: dict[str, str] = {
    "reference": "mambakit.kernels.reference:ssd_scan_ref",
    "chunked": "mambakit.kernels.ssd:ssd_chunked",
    "cpu": "mambakit.core.ssd:_ssd_on_cpu_scan",
    "triton": "mambakit.core.ssd:_ssd_on_triton_scan",
}
_DEVICE_OF_BACKEND = {"cpu": "cpu", "triton": "cuda"}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_ssd_backends() -> list[str]:
    return sorted(_BACKENDS)


def _load(path: str) -> Callable:
    module, _, fn = path.partition(":")
    return getattr(importlib.import_module(module), fn)


def _shape_of(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _expect(fn: str, name: str, t, shapes: tuple[tuple, ...], device: torch.device, optional: bool = False) -> None:
    """Check that t is a floating tensor on `device` with one of `shapes` (shown as "(a, b) or (a,)")."""
    wanted = " or ".join(str(tuple(s)) for s in shapes)
    if t is None:
        if optional:
            return
        raise ValueError(f"{fn}: {name} is required, expected shape {wanted}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor of shape {wanted}, got {type(t).__name__}")
    if tuple(t.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {wanted}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected a floating dtype")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} (the device of x)")


def _check_dt_limit(fn: str, dt_limit) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: dt_limit must be a pair (min, max) of numbers, got {dt_limit!r}") from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"{fn}: dt_limit must satisfy min <= max, got {dt_limit!r}")
    return lo, hi


def _groups(fn: str, B, b: int, L: int | None, h: int) -> tuple[int, int]:
    """(g, n) from B, checking that g divides h; L=None for the one-step form (b, g, n)."""
    lead = (b,) if L is None else (b, L)
    form = "(batch, groups, dstate)" if L is None else "(batch, length, groups, dstate)"
    if not isinstance(B, torch.Tensor) or B.dim() != len(lead) + 2 or tuple(B.shape[:len(lead)]) != lead:
        raise ValueError(f"{fn}: B has shape {_shape_of(B)}, expected {(*lead, 'g', 'n')} {form}")
    g, n = B.shape[-2], B.shape[-1]
    if g < 1 or h % g:
        raise ValueError(f"{fn}: B has {g} groups, which must divide nheads={h}")
    return g, n


def check_ssd_inputs(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_limit=(0.0, float("inf")),
                     dt_multiplier=None, initial_states=None) -> None:
    """Raise a ValueError/TypeError naming the offending argument and the expected shape."""
    fn = "ssd_scan"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{fn}: x must have shape (batch, length, nheads, headdim), got {_shape_of(x)}")
    b, L, h, p = x.shape
    dev = x.device
    _expect(fn, "x", x, ((b, L, h, p),), dev)
    _expect(fn, "dt", dt, ((b, L, h),), dev)
    _expect(fn, "A", A, ((h,),), dev)
    g, n = _groups(fn, B, b, L, h)
    _expect(fn, "B", B, ((b, L, g, n),), dev)
    _expect(fn, "C", C, ((b, L, g, n),), dev)
    _expect(fn, "D", D, ((h,), (h, p)), dev, optional=True)
    _expect(fn, "z", z, ((b, L, h, p),), dev, optional=True)
    _expect(fn, "dt_bias", dt_bias, ((h,),), dev, optional=True)
    _expect(fn, "dt_multiplier", dt_multiplier, ((b, L, h),), dev, optional=True)
    _expect(fn, "initial_states", initial_states, ((b, h, p, n),), dev, optional=True)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    _check_dt_limit(fn, dt_limit)


def _resolve(backend: str, device: torch.device) -> Callable:
    if backend == "auto":
        backend = "chunked"  # on every device until GPU timings say otherwise (see benchmarks/scan_gpu.py)
    if backend not in _BACKENDS:
        raise ValueError(f"ssd_scan: unknown backend {backend!r}; expected 'auto' or one of {sorted(_BACKENDS)}")
    needed = _DEVICE_OF_BACKEND.get(backend)
    if needed is not None and device.type != needed:
        raise ValueError(f"ssd_scan: backend {backend!r} needs {needed.upper()} tensors, got tensors on {device}")
    return _load(_BACKENDS[backend])


def _ssd_on_scan(scan_backend: str, *args, **kwargs):
    from functools import partial

    from mambakit.core.scan import selective_scan
    from mambakit.kernels.ssd import ssd_via_selective_scan
    return ssd_via_selective_scan(partial(selective_scan, backend=scan_backend), *args, **kwargs)


def _ssd_on_cpu_scan(*args, **kwargs):
    return _ssd_on_scan("cpu", *args, **kwargs)


def _ssd_on_triton_scan(*args, **kwargs):
    return _ssd_on_scan("triton", *args, **kwargs)


def ssd_scan(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), dt_multiplier=None, initial_states=None, return_final_states=False,
             backend="auto"):
    """The Mamba-2 SSD scan (see the module docstring for shapes and semantics).

    Returns y (b, L, h, p) in x's dtype and, when `return_final_states`, the state after step L
    (b, h, p, n) in float32 (float64 for float64 inputs). Gradients flow to every tensor input, including
    dt_multiplier and initial_states, and from the final states. Any L works. `chunk_size`, the longest
    chunk, is used by "chunked" only (chunks are equalised, and the tail padded with steps that leave the
    state unchanged). Every backend supports every argument.
    """
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, dt_multiplier, initial_states)
    fn = _resolve(backend, x.device)
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
                  dt_multiplier=dt_multiplier, initial_states=initial_states, return_final_states=return_final_states)
    if backend in ("auto", "chunked"):
        kwargs["chunk_size"] = chunk_size
    return fn(x, dt, A, B, C, **kwargs)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), dt_multiplier=None, backend="auto"):
    """One Mamba-2 decoding step: updates `state` in place and returns y (b, h, p) in x's dtype.

    state: (b, h, p, n); x, z: (b, h, p); dt, dt_multiplier: (b, h); A, dt_bias: (h,); B, C: (b, g, n);
    D: (h,) or (h, p). Feeding a sequence step by step equals `ssd_scan` over it (same dt processing).
    Backends: "torch" (plain PyTorch, any device), "triton" (CUDA: mambakit's state-update kernel on the
    flattened (b, h*p, n) state), "auto" (triton on CUDA, torch elsewhere). Forward only for "triton".
    """
    fn = "ssd_state_update"
    if not isinstance(state, torch.Tensor) or state.dim() != 4:
        raise ValueError(f"{fn}: state must have shape (batch, nheads, headdim, dstate), got {_shape_of(state)}")
    b, h, p, n = state.shape
    dev = state.device
    _expect(fn, "state", state, ((b, h, p, n),), dev)
    _expect(fn, "x", x, ((b, h, p),), dev)
    _expect(fn, "dt", dt, ((b, h),), dev)
    _expect(fn, "A", A, ((h,),), dev)
    g, _ = _groups(fn, B, b, None, h)
    _expect(fn, "B", B, ((b, g, n),), dev)
    _expect(fn, "C", C, ((b, g, n),), dev)
    _expect(fn, "D", D, ((h,), (h, p)), dev, optional=True)
    _expect(fn, "z", z, ((b, h, p),), dev, optional=True)
    _expect(fn, "dt_bias", dt_bias, ((h,),), dev, optional=True)
    _expect(fn, "dt_multiplier", dt_multiplier, ((b, h),), dev, optional=True)
    dt_limit = _check_dt_limit(fn, dt_limit)
    if backend == "auto":
        backend = "triton" if dev.type == "cuda" else "torch"
    if backend == "torch":
        from mambakit.kernels.ssd import ssd_step
        return ssd_step(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                        dt_limit=dt_limit, dt_multiplier=dt_multiplier)
    if backend != "triton":
        raise ValueError(f"{fn}: unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    if dev.type != "cuda":
        raise ValueError(f"{fn}: backend 'triton' needs CUDA tensors, got tensors on {dev}")
    from mambakit.kernels.triton_scan import selective_state_update_triton
    return _ssd_state_update_triton(selective_state_update_triton, state, x, dt, A, B, C, D, z, dt_bias,
                                    dt_softplus, dt_limit, dt_multiplier)


def _ssd_state_update_triton(kernel, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, dt_multiplier):
    """The Triton kernel applies dt_bias and softplus itself; dt_multiplier (before them) and dt_limit (after
    them) are applied here, in which case dt reaches the kernel fully processed."""
    ct = torch.float64 if state.dtype == torch.float64 else torch.float32
    if dt_limit != (0.0, float("inf")):
        from mambakit.kernels.ssd import process_dt
        dt = process_dt(dt.to(ct), dt_bias, dt_softplus, dt_limit, dt_multiplier)
        dt_bias, dt_softplus = None, False
    elif dt_multiplier is not None:
        dt = dt.to(ct) * dt_multiplier.to(ct)
    return kernel(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
