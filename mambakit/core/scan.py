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
           "check_scan_inputs", "resolve_backend", "runs_fused_cpu_kernel"]

# name -> "module:function"; imported on first use so that importing mambakit never compiles anything.
_BACKENDS: dict[str, str] = {
    "reference": "mambakit.kernels.reference:selective_scan_ref",
    "cpu": "mambakit.kernels.cpu_scan:selective_scan_cpu",
    "triton": "mambakit.kernels.triton_scan:selective_scan_triton",
}
# The one-token update is cheap on a CPU: the reference serves "cpu" there.
_STATE_UPDATE: dict[str, str] = {
    "reference": "mambakit.kernels.reference:selective_state_update_ref",
    "cpu": "mambakit.kernels.reference:selective_state_update_ref",
    "triton": "mambakit.kernels.triton_scan:selective_state_update_triton",
}
#: Backends whose scan takes `reverse=` and walks time backwards itself; the others get flipped copies.
_REVERSIBLE = {"cpu"}
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


def resolve_backend(backend: str, device: torch.device, table: dict[str, str] | None = None) -> str:
    """The backend name `backend` runs as on `device` ("auto": triton on CUDA, the fused kernel on CPU, else the
    reference)."""
    table = _BACKENDS if table is None else table
    if not isinstance(backend, str):
        raise TypeError(f"selective_scan: backend must be a string, 'auto' or one of {sorted(table)}, "
                        f"got {type(backend).__name__}")
    if backend == "auto" and device.type not in ("cuda", "cpu"):
        backend = "reference"
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
    return backend


def runs_fused_cpu_kernel(backend: str, device: torch.device) -> bool:
    """Whether a scan with `backend` on `device` is the fused CPU kernel, which reads strided (token-major)
    tensors in place, walks time backwards and projects delta itself: the mixers lay out their memory for it."""
    return device.type == "cpu" and resolve_backend(backend, device) == "cpu"


def _resolve(backend: str, device: torch.device, table: dict[str, str]) -> Callable:
    return _load(table[resolve_backend(backend, device, table)])


def _shape_text(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


def _expect(name: str, t, shape: tuple, device: torch.device, optional: bool = False,
            fn: str = "selective_scan") -> None:
    """Check one argument: a floating tensor of exactly `shape` on `device` (None allowed if optional)."""
    shape_text = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    if t is None:
        if optional:
            return
        raise ValueError(f"{fn}: {name} is required, expected a tensor of shape {shape_text}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor of shape {shape_text}, got {_shape_text(t)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {shape_text}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected float16, bfloat16, float32 "
                        f"or float64")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} (the device of u)")


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None) -> None:
    """Raise a ValueError/TypeError naming the offending argument and the expected shape.

    u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L) or (b, G, N, L) with G dividing d, both the same shape
    (as in mamba_ssm); D, delta_bias: (d,); initial_state: (b, d, N); floating dtypes; all on u's device.
    """
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"selective_scan: u must be a tensor of shape (batch, dim, length), got {_shape_text(u)}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u has shape {tuple(u.shape)}, expected (batch, dim, length)")
    b, d, L = u.shape
    dev = u.device
    _expect("u", u, (b, d, L), dev)
    _expect("delta", delta, (b, d, L), dev)
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"selective_scan: A must be a tensor of shape ({d}, N), got {_shape_text(A)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A has shape {tuple(A.shape)}, expected ({d}, N) (dim of u = {d})")
    N = A.shape[1]
    _expect("A", A, (d, N), dev)
    for name, t in (("B", B), ("C", C)):
        expected = f"({b}, {N}, {L}) or ({b}, G, {N}, {L})"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a tensor of shape {expected}, got {_shape_text(t)}")
        if t.dim() not in (3, 4):
            raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {expected}")
        if t.dim() == 3:
            if tuple(t.shape) != (b, N, L):
                raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {expected} "
                                 f"(batch {b}, N = A.shape[1] = {N}, length {L})")
            _expect(name, t, (b, N, L), dev)
        else:
            G = t.shape[1]
            if G < 1 or d % G:
                raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}: its {G} groups must divide "
                                 f"dim = {d}")
            if tuple(t.shape) != (b, G, N, L):
                raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {expected} "
                                 f"(batch {b}, N = A.shape[1] = {N}, length {L})")
            _expect(name, t, (b, G, N, L), dev)
    if B.shape != C.shape:
        raise ValueError(f"selective_scan: B has shape {tuple(B.shape)} and C {tuple(C.shape)}; they must have the "
                         f"same shape (the same number of groups)")
    _expect("D", D, (d,), dev, optional=True)
    _expect("z", z, (b, d, L), dev, optional=True)
    _expect("delta_bias", delta_bias, (d,), dev, optional=True)
    _expect("initial_state", initial_state, (b, d, N), dev, optional=True)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, backend="auto", reverse=False):
    """The Mamba-1 selective scan.

    u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L) or grouped (b, G, N, L), each group serving d/G
    channels; D, delta_bias: (d,); initial_state: (b, d, N). Returns out (b, d, L) in u's dtype and, when
    `return_last_state`, the last state (b, d, N) in float32 (float64 for float64 inputs). Gradients flow
    to every tensor input, including initial_state, and from the last state.

    reverse: scan from the last step to the first, `flip(scan(flip(inputs)))` (a bidirectional mixer's
    backward direction). The fused CPU kernel walks time backwards in place; other backends flip copies.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    name = resolve_backend(backend, u.device)
    fn = _load(_BACKENDS[name])
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  return_last_state=return_last_state, initial_state=initial_state)
    if name in _REVERSIBLE:
        return fn(u, delta, A, B, C, reverse=bool(reverse), **kwargs)
    from mambakit.kernels.cpu_scan import flipped
    return flipped(fn, bool(reverse), u, delta, A, B, C, **kwargs)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend="auto"):
    """One recurrent step for decoding: updates `state` (b, d, N) in place and returns out (b, d).

    x, dt, z: (b, d); A: (d, N); B, C: (b, N) or (b, G, N) with G dividing d; D, dt_bias: (d,).
    """
    fn = "selective_state_update"
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{fn}: state must be a tensor of shape (batch, dim, N), got {_shape_text(state)}")
    if state.dim() != 3:
        raise ValueError(f"{fn}: state has shape {tuple(state.shape)}, expected (batch, dim, N)")
    b, d, N = state.shape
    dev = state.device
    _expect("state", state, (b, d, N), dev, fn=fn)
    for name, t, shape, optional in (("x", x, (b, d), False), ("dt", dt, (b, d), False), ("A", A, (d, N), False),
                                     ("z", z, (b, d), True), ("D", D, (d,), True), ("dt_bias", dt_bias, (d,), True)):
        _expect(name, t, shape, dev, optional=optional, fn=fn)
    for name, t in (("B", B), ("C", C)):
        grouped = isinstance(t, torch.Tensor) and t.dim() == 3
        if grouped and (t.shape[1] < 1 or d % t.shape[1]):
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}: its {t.shape[1]} groups must divide dim = {d}")
        if isinstance(t, torch.Tensor) and t.dim() not in (2, 3):
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected ({b}, {N}) or ({b}, G, {N})")
        _expect(name, t, (b, t.shape[1], N) if grouped else (b, N), dev, fn=fn)
    if B.shape != C.shape:
        raise ValueError(f"{fn}: B has shape {tuple(B.shape)} and C {tuple(C.shape)}; they must have the same shape")
    impl = _resolve(backend, dev, _STATE_UPDATE)
    return impl(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
