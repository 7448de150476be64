"""Linear layers across the two layouts of a sequence, without layout copies.

The Mamba-1 mixers keep their activations channel-major, (b, channels, L) contiguous, as mamba_ssm does and as
the scan and conv1d want them, while the model around them is token-major, (b, L, d_model). A Linear between
the two is one GEMM per sample whichever way round, since BLAS reads either operand transposed in place:

    channel_major_linear(x, W, bias)   x[i] (in, L), any of the two layouts  ->  (b, out, L) contiguous
    token_major_linear(y, W, bias)     y[i] (in, L)                          ->  (b, L, out) contiguous
    same_layout_linear(x, W, bias)     x[i] (in, L)                          ->  (b, out, L) in x's layout

On the CPU the Mamba-1 mixers keep token-major memory behind their (b, channels, L) views (see
`mambakit.core.mamba`): there the row count of a GEMM is the token count, the shape MKL runs fastest.
`cpu_batch_chunk` sizes the parts a CPU forward of a large batch runs in, so that a layer's activations stay in
cache (used by Vim).

`F.linear` / `torch.matmul` fold the batch into the rows and so copy whenever the input is a transposed view,
and autograd's own backward of a batched GEMM hands gradients back in the transposed layout, which the next
kernel then copies. The autograd Function here gives every gradient in the layout of its input: the gradient
of a channel-major tensor is contiguous channel-major, that of a transposed token-major view is contiguous
token-major memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.kernels.cpu_scan import is_token_major

__all__ = ["channel_major_linear", "token_major_linear", "same_layout_linear", "is_token_major",
           "cpu_batch_chunk", "CPU_BATCH_TOKENS"]

#: Tokens per part when a CPU forward runs a large batch in parts (`cpu_batch_chunk`): a layer's activations
#: (in_proj's output alone is 3 KiB per token for Vim-Ti) then stay in the L3 cache between the passes over them
#: instead of streaming from memory. Vim-Ti, batch 8, 2 cores, 32 MiB L3 (2026-12-03, alternated runs):
#: inference at 1024 px 9.0-9.4 s in one pass, 7.6-8.5 s in parts of one or two images (8194 tokens); 768 px in
#: parts of two or three images 4.2-5.0 s against 4.0-4.8 s in one pass (no difference), 512 px in parts of one
#: image slower (2.3-2.6 s against 2.1 s). Training (forward + backward, the backward then also runs part by
#: part): 1024 px 33.5-35.5 s in one pass, 30.2-31.6 s in parts of two images, 31.1-32.3 s of one; 768 px
#: 15.8-21.4 s in one pass, 16.3-21.3 s in parts of three; 512 px 7.0-7.8 s in one pass, 7.1-7.7 s in parts of
#: four, 7.5-8.9 s of one. 9000 tokens: two images at 1024 px, three at 768, one pass at 512.
CPU_BATCH_TOKENS = 9000


def _bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batched a @ b (+ bias), a 2D operand shared by every sample (expanded, not copied)."""
    n = a.shape[0] if a.dim() == 3 else b.shape[0]
    a = a.expand(n, *a.shape) if a.dim() == 2 else a
    b = b.expand(n, *b.shape) if b.dim() == 2 else b
    return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):        # a device type without autocast support
        return None
    return None


class _Linear(torch.autograd.Function):
    """out[i] = W @ x[i] (+ bias) for x (b, in, L); written channel-major (b, out, L) or token-major (b, L, out)."""

    @staticmethod
    def forward(ctx, x, weight, bias, token_major_out):
        cast = _autocast_dtype(x.device)
        if cast is not None:                 # as autocast would run the GEMM; backward then runs in that dtype
            x, weight = x.to(cast), weight.to(cast)
            bias = bias.to(cast) if bias is not None else None
        if token_major_out:
            out = _bmm(x.transpose(1, 2), weight.t(), bias)
        else:
            out = _bmm(weight, x, None if bias is None else bias.unsqueeze(-1))
        ctx.save_for_backward(x, weight)
        ctx.token_major_out = token_major_out
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.transpose(1, 2) if ctx.token_major_out else grad                    # (b, out, L)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if is_token_major(x):                                                  # token-major memory
                dx = _bmm(g.transpose(1, 2), weight).transpose(1, 2)
            else:
                dx = _bmm(weight.t(), g)
        if ctx.needs_input_grad[1]:
            dw = g[0] @ x[0].t() if x.shape[0] == 1 else torch.bmm(g, x.transpose(1, 2)).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum((0, 2))
        return dx, dw, db, None


def _check(what: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 3 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{what}: x has shape {tuple(x.shape)}, expected (batch, {weight.shape[-1]}, length) "
                         f"for a weight of shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{what}: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def channel_major_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (b, in, L) -> contiguous (b, out, L), out[i] = weight @ x[i] (+ bias[:, None]).

    x may be contiguous or the transposed view `h.transpose(1, 2)` of a token-major h (b, L, in): either is
    read in place, and its gradient comes back in the same memory layout."""
    _check("channel_major_linear", x, weight, bias)
    return _Linear.apply(x, weight, bias, False)


def same_layout_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (b, in, L) -> (b, out, L), out[i] = weight @ x[i] (+ bias[:, None]), laid out as x: the transposed
    view of a contiguous (b, L, out) tensor for token-major x, contiguous channel-major otherwise."""
    if is_token_major(x):
        return token_major_linear(x, weight, bias).transpose(1, 2)
    return channel_major_linear(x, weight, bias)


def token_major_linear(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (b, in, L) -> contiguous token-major (b, L, out): `F.linear(y.transpose(1, 2), weight, bias)` without
    materialising the transpose (y's gradient comes back in y's layout)."""
    _check("token_major_linear", y, weight, bias)
    if y.transpose(1, 2).is_contiguous():     # token-major memory: a plain (b L, in) GEMM, gradient alike
        return F.linear(y.transpose(1, 2), weight, bias)
    return _Linear.apply(y, weight, bias, True)


def cpu_batch_chunk(x: torch.Tensor, tokens_per_sample: int, budget: int | None = None) -> int:
    """How many samples of x (batch first) a CPU forward should run at once: all of them when they hold at
    most `budget` tokens (default CPU_BATCH_TOKENS), else as many as fit (at least one). For a model whose
    samples are computed independently (no batch statistics), with or without autograd. Other devices run
    the whole batch."""
    budget = CPU_BATCH_TOKENS if budget is None else budget
    b = x.shape[0]
    if x.device.type != "cpu" or b <= 1 or b * tokens_per_sample <= budget:
        return b
    return max(1, budget // max(1, tokens_per_sample))
