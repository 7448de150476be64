"""`selective_scan`: the one entry point to the Mamba-1 scan, with `mamba_ssm.selective_scan_fn`'s semantics.

Backends: "reference" (the sequential loop, any dtype), "cpu" (fused kernel for CPU tensors),
"triton" (CUDA tensors), "auto" (triton on CUDA, cpu on CPU). Inputs are validated here, once, so every
backend can assume well-formed tensors.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

__all__ = ["selective_scan", "selective_state_update", "register_backend", "available_backends",
           "check_scan_inputs"]

# name -> "module:function"; imported on first use so that importing mambakit never compiles anything.
_BACKENDS: dict[str, str] = {
    "reference": "mambakit.kernels.reference:selective_scan_ref",
}
_STATE_UPDATE: dict[str, str] = {
    "reference": "mambakit.kernels.reference:selective_state_update_ref",
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def register_backend(name: str, scan: str, state_update: str | None = None) -> None:
    """Register a backend by import path ("package.module:function")."""
    _BACKENDS[name] = scan
    if state_update is not None:
        _STATE_UPDATE[name] = state_update


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def _load(path: str) -> Callable:
    module, _, fn = path.partition(":")
    return getattr(importlib.import_module(module), fn)


def _resolve(backend: str, device: torch.device, table: dict[str, str]) -> Callable:
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
        if backend not in table:
            backend = "reference"
    if backend not in table:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; expected 'auto' or one of {sorted(table)}")
    if backend == "triton" and device.type != "cuda":
        raise ValueError(f"selective_scan: backend 'triton' needs CUDA tensors, got tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"selective_scan: backend 'cpu' needs CPU tensors, got tensors on {device}")
    return _load(table[backend])


def _expect(name: str, t: torch.Tensor | None, shape: tuple, device: torch.device, optional: bool = False):
    if t is None:
        if optional:
            return
        raise ValueError(f"selective_scan: {name} is required, expected shape {shape}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"selective_scan: {name} must be a tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"selective_scan: {name} has dtype {t.dtype}, expected a floating dtype")
    if t.device != device:
        raise ValueError(f"selective_scan: {name} is on {t.device}, expected {device} (the device of u)")


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None) -> None:
    """Raise a ValueError/TypeError naming the offending argument and the expected shape."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"selective_scan: u must have shape (batch, dim, length), got {got}")
    b, d, L = u.shape
    dev = u.device
    _expect("u", u, (b, d, L), dev)
    _expect("delta", delta, (b, d, L), dev)
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != d:
        got = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise ValueError(f"selective_scan: A has shape {got}, expected ({d}, N)")
    N = A.shape[1]
    _expect("A", A, (d, N), dev)
    for name, t in (("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"selective_scan: {name} has shape {got}, expected ({b}, {N}, {L}) or ({b}, G, {N}, {L})")
        if t.dim() == 3:
            _expect(name, t, (b, N, L), dev)
        else:
            G = t.shape[1]
            if G < 1 or d % G:
                raise ValueError(f"selective_scan: {name} has {G} groups, which must divide dim={d}")
            _expect(name, t, (b, G, N, L), dev)
    _expect("D", D, (d,), dev, optional=True)
    _expect("z", z, (b, d, L), dev, optional=True)
    _expect("delta_bias", delta_bias, (d,), dev, optional=True)
    _expect("initial_state", initial_state, (b, d, N), dev, optional=True)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, backend="auto"):
    """The Mamba-1 selective scan.

    u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L) or grouped (b, G, N, L), each group serving d/G
    channels; D, delta_bias: (d,); initial_state: (b, d, N). Returns out (b, d, L) in u's dtype and, when
    `return_last_state`, the last state (b, d, N) in float32 (float64 for float64 inputs). Gradients flow
    to every tensor input, including initial_state, and from the last state.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    fn = _resolve(backend, u.device, _BACKENDS)
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state, initial_state=initial_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend="auto"):
    """One recurrent step for decoding: updates `state` (b, d, N) in place and returns out (b, d).

    x, dt, z: (b, d); A: (d, N); B, C: (b, N) or (b, G, N); D, dt_bias: (d,).
    """
    if state.dim() != 3:
        raise ValueError(f"selective_state_update: state has shape {tuple(state.shape)}, expected (batch, dim, N)")
    b, d, N = state.shape
    for name, t, shape in (("x", x, (b, d)), ("dt", dt, (b, d)), ("A", A, (d, N)), ("z", z, (b, d)),
                           ("D", D, (d,)), ("dt_bias", dt_bias, (d,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_state_update: {name} has shape {tuple(t.shape)}, expected {shape}")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, N) and not (t.dim() == 3 and t.shape[0] == b and t.shape[2] == N and d % t.shape[1] == 0):
            raise ValueError(f"selective_state_update: {name} has shape {tuple(t.shape)}, expected ({b}, {N}) or ({b}, G, {N})")
    fn = _resolve(backend, state.device, _STATE_UPDATE)
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
