"""The fused CPU causal depthwise conv1d (+ SiLU) of a Mamba branch: mamba_ssm's `causal_conv1d_fn` on CPU.

    out[b, c, t] = act(bias[c] + sum_k weight[c, k] x[b, c, t - (K-1) + k]),  x = 0 before the start,
    act = silu or identity.

It lives in the same C library as the fused scan (csrc/selective_scan_cpu.c, compiled on first use; see
`mambakit.kernels.cpu_scan`). Against `F.conv1d(padding=K-1)[..., :L]` followed by `F.silu` it reads and writes
each tensor once per pass instead of three to four times, and its backward recomputes the conv output from x
instead of keeping it, so autograd holds one (b, d, L) tensor per call instead of two. It reads x in place in
any layout (channel-major rows, or token-major memory such as half of in_proj's (b, L, 2 d_inner) output) and
writes the output and x's gradient in x's layout; `reverse` runs it backwards in time (the conv of the flipped
sequence, flipped back) without copies. Where the kernel cannot be built, or for other devices and dtypes,
`causal_conv1d` runs the torch ops instead (same values).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mambakit.kernels.cpu_scan import KernelUnavailable, Stride, empty_like_layout, load_library, strided

__all__ = ["causal_conv1d", "causal_conv1d_cpu", "causal_conv1d_torch", "MAX_KERNEL_SIZE"]

#: Widest kernel the fused path takes (mamba_ssm's causal_conv1d takes 2..4); wider ones run the torch ops.
MAX_KERNEL_SIZE = 16


class _ConvArgs(ctypes.Structure):
    """Mirror of `mk_conv_args` in csrc/selective_scan_cpu.c (field order matters)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "w", "bias", "out", "dout", "dx", "dw", "dbias")]
    _fields_ += [(name, ctypes.c_int64) for name in ("batch", "dim", "len", "K")]
    _fields_ += [(name, Stride) for name in ("sx", "sout", "sdout", "sdx")]
    _fields_ += [("silu", ctypes.c_int32), ("nthreads", ctypes.c_int32)]


def _conv_args(reverse: bool, **kw) -> _ConvArgs:
    """_ConvArgs with x, out, dout, dx (tensors) as addresses and strides, the other tensors as addresses."""
    for name in ("x", "out", "dout", "dx"):
        kw[name], kw["s" + name] = strided(kw.get(name), reverse)
    for name, value in kw.items():
        if isinstance(value, torch.Tensor):
            kw[name] = value.data_ptr()
    return _ConvArgs(**kw)


def _library(dtype: torch.dtype) -> ctypes.CDLL:
    lib = load_library(dtype)
    if not getattr(lib, "_mk_conv_ready", False):
        lib.mk_conv_args_size.restype = ctypes.c_int64
        if lib.mk_conv_args_size() != ctypes.sizeof(_ConvArgs):
            raise KernelUnavailable(f"{lib._name}: mk_conv_args has {lib.mk_conv_args_size()} bytes, expected "
                                    f"{ctypes.sizeof(_ConvArgs)}")
        for fn in (lib.mk_conv_fwd, lib.mk_conv_bwd):
            fn.argtypes = [ctypes.POINTER(_ConvArgs)]
            fn.restype = ctypes.c_int
        lib._mk_conv_ready = True
    return lib


def _check(rc: int, what: str) -> None:
    if rc == 1:
        raise MemoryError(f"causal_conv1d (cpu): the {what} kernel could not allocate its workspace")
    if rc != 0:
        raise RuntimeError(f"causal_conv1d (cpu): the {what} kernel rejected its arguments (code {rc})")


class _CausalConv1dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        ct = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (x, weight, bias)) \
            else torch.float32
        lib = _library(ct)
        b, d, L = x.shape
        K = weight.shape[-1]
        x_ = x.detach().to(ct)                    # read in place through its strides
        w_ = weight.detach().reshape(d, K).to(ct).contiguous()
        bias_ = None if bias is None else bias.detach().to(ct).contiguous()
        out = empty_like_layout(x_, ct)
        args = _conv_args(reverse, x=x_, w=w_, bias=bias_, out=out, batch=b, dim=d, len=L, K=K, silu=int(silu),
                          nthreads=torch.get_num_threads())
        _check(lib.mk_conv_fwd(ctypes.byref(args)), "forward")
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x_, w_, bias_)
            ctx.info = (silu, reverse, weight.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out if x.dtype == ct else out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x_, w_, bias_ = ctx.saved_tensors
        silu, reverse, w_shape, x_dtype, w_dtype, b_dtype = ctx.info
        ct = x_.dtype
        lib = _library(ct)
        b, d, L = x_.shape
        dout_ = dout.to(ct)
        dx, dw = empty_like_layout(x_, ct), torch.empty(d, w_.shape[1], dtype=ct)
        dbias = None if bias_ is None else torch.empty(d, dtype=ct)
        args = _conv_args(reverse, x=x_, w=w_, bias=bias_, dout=dout_, dx=dx, dw=dw, dbias=dbias, batch=b, dim=d,
                          len=L, K=w_.shape[1], silu=int(silu), nthreads=torch.get_num_threads())
        _check(lib.mk_conv_bwd(ctypes.byref(args)), "backward")
        need = ctx.needs_input_grad
        return (dx.to(x_dtype) if need[0] else None, dw.reshape(w_shape).to(w_dtype) if need[1] else None,
                dbias.to(b_dtype) if dbias is not None and need[2] else None, None, None)


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        activation: str | None = None, reverse: bool = False) -> torch.Tensor:
    """The same with torch ops: x (b, d, L), weight (d, K) or (d, 1, K), bias (d,)."""
    if reverse:
        return causal_conv1d_torch(x.flip(-1), weight, bias, activation).flip(-1)
    d, K = weight.shape[0], weight.shape[-1]
    out = F.conv1d(x, weight.reshape(d, 1, K), bias, padding=K - 1, groups=d)[..., : x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


def _check_arguments(x, weight, bias, activation) -> None:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, length), got shape {tuple(x.shape)}")
    d = x.shape[1]
    if weight.dim() not in (2, 3) or weight.shape[0] != d or (weight.dim() == 3 and weight.shape[1] != 1):
        raise ValueError(f"causal_conv1d: weight must be ({d}, K) or ({d}, 1, K) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"causal_conv1d: bias must have shape ({d},), got {tuple(bias.shape)}")


def causal_conv1d_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None, reverse: bool = False) -> torch.Tensor:
    """The fused kernel (raises KernelUnavailable where it cannot be built); CPU tensors only."""
    _check_arguments(x, weight, bias, activation)
    _library(torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32)
    if reverse and x.stride(-1) == 1 and x.shape[-1] > 1:
        # rows walked backwards would be read lane by lane; two flips are cheaper (2.2 against 0.85 ms at
        # (1, 384, 2305) on 2 cores)
        return _CausalConv1dCPU.apply(x.flip(-1), weight, bias, activation is not None, False).flip(-1)
    return _CausalConv1dCPU.apply(x, weight, bias, activation is not None, bool(reverse))


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, reverse: bool = False) -> torch.Tensor:
    """Causal depthwise conv1d (+ SiLU) over x (b, d, L): the fused kernel for CPU float32 / float64 tensors
    with a kernel of at most MAX_KERNEL_SIZE taps, the torch ops otherwise. With `reverse`, the conv runs
    backwards in time (anti-causal): `flip(causal_conv1d(flip(x)))`."""
    _check_arguments(x, weight, bias, activation)
    tensors = [t for t in (x, weight, bias) if t is not None]
    fused = (all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
             and weight.shape[-1] <= MAX_KERNEL_SIZE and not torch.is_autocast_enabled("cpu"))
    if fused:
        try:
            return causal_conv1d_cpu(x, weight, bias, activation, reverse)
        except KernelUnavailable:
            pass                                  # the scan warns about the missing kernel once; same values here
    return causal_conv1d_torch(x, weight, bias, activation, reverse)
