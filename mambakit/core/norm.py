"""RMSNorm and the gated RMSNorm of Mamba-2, with `mamba_ssm`'s parameter names (`weight`, no bias).

Half-precision inputs are normalised in float32 and cast back, as `mamba_ssm`'s reference does, so that the
mean of squares does not overflow in fp16 or lose precision in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "RMSNormGated"]

_HALF = (torch.float16, torch.bfloat16)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension. x: (..., hidden_size)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNorm: input has shape {tuple(x.shape)}, expected (..., {self.hidden_size})")
        xf = _upcast(x)
        y = F.rms_norm(xf, (self.hidden_size,), self.weight.to(xf.dtype), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """Mamba-2's output norm: RMSNorm with an optional SiLU gate z, normalised per group of `group_size`.

    norm_before_gate=True:  y = rmsnorm(x) * silu(z)
    norm_before_gate=False: y = rmsnorm(x * silu(z))      (Mamba2's setting)
    x, z: (..., hidden_size); group_size=None means one group over the whole last dimension.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        group_size = hidden_size if group_size is None else group_size
        if group_size < 1 or hidden_size % group_size:
            raise ValueError(f"RMSNormGated: group_size={group_size} must divide hidden_size={hidden_size}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNormGated: x has shape {tuple(x.shape)}, expected (..., {self.hidden_size})")
        if z is not None and z.shape != x.shape:
            raise ValueError(f"RMSNormGated: z has shape {tuple(z.shape)}, expected {tuple(x.shape)} (the shape of x)")
        xf = _upcast(x)
        zf = _upcast(z) if z is not None else None
        if zf is not None and not self.norm_before_gate:
            xf = xf * F.silu(zf)
        groups = xf.unflatten(-1, (self.hidden_size // self.group_size, self.group_size))
        y = F.rms_norm(groups, (self.group_size,), None, self.eps).flatten(-2) * self.weight.to(xf.dtype)
        if zf is not None and self.norm_before_gate:
            y = y * F.silu(zf)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
