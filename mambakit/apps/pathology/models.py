"""MIL models over a bag of patch features: MambaMIL (SR-Mamba) and the baselines of its harness
(mean pooling, max pooling, ABMIL, TransMIL), with MambaMIL's module and parameter names so that upstream
state dicts load by key (see convert.py).

Every model takes a bag `x` of shape (N, D) or (1, N, D) and returns logits (1, n_classes); subtyping reads
them with a softmax, survival as discrete hazards (sigmoid, see losses.py). `forward(x, return_scores=True)`
also returns per-instance scores (1, N) for heatmaps: attention weights (MambaMIL, ABMIL) or the instance
logit of the top class (mean / max pooling). TransMIL has no per-instance score.

Upstream facts (isyangshu/MambaMIL at 9aea39e):
- MambaMIL: `_fc1` = Linear(in, 512) -> GELU [-> Dropout(p)]; `layers[i]` = Sequential(LayerNorm(512),
  mixer) with a residual; `norm` LayerNorm; `attention` Linear(512,128)-Tanh-Linear(128,1) softmax pooling
  (not gated); `classifier` Linear(512, C); then `initialize_weights` over the whole model (Xavier-normal on
  every Linear, the mixers' included, zero biases: dt_proj's bias ends at 0). Mixers: SRMamba (identity +
  stride-R reorder with zero padding, summed before out_proj), Mamba, BiMamba (identity + flip, summed).
- mean_mil / max_mil: an instance classifier Linear(in,512)-ReLU-Dropout(0.25)-Linear(512,C), logits
  averaged / max-pooled over instances.
- att_mil: `DAttention` (ReLU features, dropout 0.25 when asked, Tanh attention, PyTorch default init);
  the repo also has `GatedAttention` (gated: true here).
- trans_mil: TransMIL with lucidrains-style Nystrom attention (8 heads of 64, 256 landmarks, 6 pinv
  iterations, residual depthwise conv of kernel 33 over values, dropout 0.1), PPEG (7/5/3 depthwise convs),
  a class token, sequence padded to a square by repeating its first tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mambakit.apps.pathology.heads import activation, attention_mlp, attention_pool, gated_attention_mlps, xavier_init
from mambakit.core.recompute import output_recomputed

__all__ = ["MambaMIL", "MeanMIL", "MaxMIL", "ABMIL", "TransMIL", "NystromAttention", "PPEG",
           "moore_penrose_iter_pinv", "as_bag", "MIXER_TYPES", "build_mil_model"]

MIXER_TYPES = ("SRMamba", "Mamba", "BiMamba")


def as_bag(x: torch.Tensor, in_dim: int, owner: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, D) or (1, N, D) -> (1, N, D) in the model's dtype (features are often stored in half precision;
    MambaMIL casts them with `.float()`), with clear errors."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"{owner}: expected one bag of shape (N, {in_dim}) or (1, N, {in_dim}), got "
                         f"{tuple(x.shape)} (MIL trains with batch size 1)")
    if x.shape[-1] != in_dim:
        raise ValueError(f"{owner}: features are {x.shape[-1]}-d, the model expects in_dim={in_dim}")
    if x.shape[1] == 0:
        raise ValueError(f"{owner}: empty bag (0 instances)")
    return x.to(dtype)


def _fc(in_dim: int, dim: int, act: str, dropout: float) -> nn.Sequential:
    layers = [nn.Linear(in_dim, dim), activation(act)]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# MambaMIL

def _mixer(kind: str, dim: int, rate: int, d_state: int, d_conv: int, expand: float) -> nn.Module:
    from mambakit.core import Mamba, MultiOrderMamba

    kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand)
    if kind == "SRMamba":
        return MultiOrderMamba.sr(dim, rate=rate, **kwargs)
    if kind == "BiMamba":
        return MultiOrderMamba.bimamba(dim, **kwargs)
    if kind == "Mamba":
        return Mamba(dim, **kwargs)
    raise ValueError(f"mixer must be one of {MIXER_TYPES}, got {kind!r}")


class MambaMIL(nn.Module):
    """MambaMIL (Yang et al., MICCAI 2024) with SR-Mamba from core's shared-projection multi-order mixer.

    in_dim: feature size (1024 for resnet50_trunc); layer: N blocks (upstream scripts: 2); rate: R
    (upstream scripts: 5; argparse default 10); mixer: SRMamba | Mamba | BiMamba; dropout after the input
    projection (upstream: 0 for subtyping, 0.25 for survival). init: "upstream" reproduces MambaMIL's
    Xavier re-initialisation of every Linear (dt_proj included); "mamba" keeps the mixers' own mamba_ssm
    initialisation (dt bias from inverse softplus) and Xavier-initialises only the MIL layers.
    checkpoint_layers: recompute each block's activations in the backward pass instead of keeping them
    (activation checkpointing: same results, less memory for very large bags, about one more forward).
    """
    scores_are_attention = True     # return_scores gives softmax attention weights


    def __init__(self, in_dim: int = 1024, n_classes: int = 2, dropout: float = 0.0, act: str = "gelu",
                 layer: int = 2, rate: int = 10, mixer: str = "SRMamba", dim: int = 512, d_state: int = 16,
                 d_conv: int = 4, expand: float = 2, init: str = "upstream", checkpoint_layers: bool = False):
        super().__init__()
        if layer < 1 or rate < 1:
            raise ValueError(f"layer and rate must be >= 1, got layer={layer}, rate={rate}")
        if init not in ("upstream", "mamba"):
            raise ValueError(f"init must be 'upstream' or 'mamba', got {init!r}")
        self.in_dim, self.n_classes, self.rate, self.mixer_type = in_dim, n_classes, rate, mixer
        self.checkpoint_layers = checkpoint_layers
        self._fc1 = _fc(in_dim, dim, act, dropout)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), _mixer(mixer, dim, rate, d_state, d_conv, expand)) for _ in range(layer))
        self.classifier = nn.Linear(dim, n_classes)
        self.attention = attention_mlp(dim)
        if init == "upstream":
            xavier_init(self)
        else:
            for part in (self._fc1, self.norm, self.classifier, self.attention):
                xavier_init(part)
            for block in self.layers:
                xavier_init(block[0])

    def _memory_efficient(self) -> bool:
        """Whether training recomputes activations in the backward (`core.set_memory_efficient` on the mixers)."""
        return any(getattr(block[1], "memory_efficient", False) for block in self.layers)

    def forward(self, x: torch.Tensor, return_scores: bool = False):
        x = as_bag(x, self.in_dim, "MambaMIL", self._fc1[0].weight.dtype)
        if self._memory_efficient() and torch.is_grad_enabled():
            # the activation's input (the projection's output, a quarter of the bag's size) is recomputed from
            # the bag in the backward rather than kept, as a norm's output in front of a memory-efficient mixer
            linear, rest = self._fc1[0], self._fc1[1:]
            h = output_recomputed(linear, x, rest, tuple(linear.parameters()))
        else:
            h = self._fc1(x)
        for block in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled() and h.requires_grad:
                h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
            elif block[1].memory_efficient and torch.is_grad_enabled():    # the norm's output recomputed too
                h = h + output_recomputed(block[0], h, block[1], tuple(block[0].parameters()))
            else:
                h = h + block(h)
        h = self.norm(h)
        pooled, a = attention_pool(h, self.attention(h).squeeze(-1))
        logits = self.classifier(pooled)
        return (logits, a) if return_scores else logits


# --------------------------------------------------------------------------------------------------
# baselines

class _InstancePoolMIL(nn.Module):
    """An instance classifier whose logits are pooled over the bag (MambaMIL's mean_mil / max_mil)."""
    scores_are_attention = False     # return_scores gives instance logits, not a distribution


    pool = "mean"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, dropout: float = 0.25, act: str = "relu",
                 dim: int = 512):
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        layers = [nn.Linear(in_dim, dim), activation(act)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dim, n_classes))
        self.head = nn.Sequential(*layers)
        xavier_init(self)

    def forward(self, x: torch.Tensor, return_scores: bool = False):
        logits = self.head(as_bag(x, self.in_dim, type(self).__name__, self.head[0].weight.dtype)[0])          # (N, C)
        pooled = logits.mean(dim=0, keepdim=True) if self.pool == "mean" else logits.max(dim=0, keepdim=True)[0]
        if not return_scores:
            return pooled
        top = pooled.argmax(dim=1)
        return pooled, logits[:, top].T                                              # (1, N)


class MeanMIL(_InstancePoolMIL):
    pool = "mean"


class MaxMIL(_InstancePoolMIL):
    pool = "max"


class ABMIL(nn.Module):
    """Attention MIL (Ilse et al. 2018) as in MambaMIL's harness. gated=False is `DAttention` (the repo's
    att_mil: `feature`, `attention`, `classifier`); gated=True is `GatedAttention` (`attention_V`,
    `attention_U`, `attention_weights`). Upstream leaves PyTorch's default init (its init call is
    commented out); init="xavier" applies MambaMIL's instead."""
    scores_are_attention = True     # return_scores gives softmax attention weights


    def __init__(self, in_dim: int = 1024, n_classes: int = 2, dropout: float = 0.0, act: str = "relu",
                 gated: bool = True, dim: int = 512, hidden: int = 128, init: str = "default"):
        super().__init__()
        self.in_dim, self.n_classes, self.gated = in_dim, n_classes, gated
        self.feature = _fc(in_dim, dim, act, dropout)
        if gated:
            self.attention_V, self.attention_U, self.attention_weights = gated_attention_mlps(dim, hidden)
        else:
            self.attention = attention_mlp(dim, hidden)
        self.classifier = nn.Sequential(nn.Linear(dim, n_classes))
        if init == "xavier":
            xavier_init(self)
        elif init != "default":
            raise ValueError(f"init must be 'default' or 'xavier', got {init!r}")

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.attention_weights(self.attention_V(h) * self.attention_U(h)).squeeze(-1)
        return self.attention(h).squeeze(-1)

    def forward(self, x: torch.Tensor, return_scores: bool = False):
        h = self.feature(as_bag(x, self.in_dim, "ABMIL", self.feature[0].weight.dtype))
        pooled, a = attention_pool(h, self.scores(h))
        logits = self.classifier(pooled)
        return (logits, a) if return_scores else logits


# --------------------------------------------------------------------------------------------------
# TransMIL

def moore_penrose_iter_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse of (..., m, m) matrices (Razavi et al.'s third-order
    iteration, as Nystromformer). The initial guess x^T / (max row sum * max column sum) uses the maxima over
    the whole batch, as the reference implementation does."""
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (col.max() * row.max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Nystromformer attention (Xiong et al. 2021) as TransMIL uses it.

    The sequence is zero-padded at the front to a multiple of `num_landmarks`; landmarks are the means of
    consecutive groups of queries and keys; attention ~ softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V
    with the pinv by `pinv_iterations` iterations; a depthwise convolution over the values (kernel
    `residual_conv_kernel` along the sequence, one filter per head) is added; heads are merged by `to_out`
    and the padding is dropped. x (B, n, dim) -> (B, n, dim).
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual: bool = True, residual_conv_kernel: int = 33,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.num_landmarks, self.pinv_iterations = heads, num_landmarks, pinv_iterations
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.residual = residual
        if residual:
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, m = self.heads, self.num_landmarks
        remainder = n % m
        if remainder:
            x = F.pad(x, (0, 0, m - remainder, 0))
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))    # (b, h, n_pad, d)
        q = q * self.scale
        group = math.ceil(n / m)
        q_land = q.unflatten(2, (m, group)).sum(dim=3) / group                       # (b, h, m, d)
        k_land = k.unflatten(2, (m, group)).sum(dim=3) / group
        attn1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)                       # (b, h, n_pad, m)
        attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)                  # (b, h, m, m)
        attn3 = (q_land @ k.transpose(-1, -2)).softmax(dim=-1)                       # (b, h, m, n_pad)
        out = (attn1 @ moore_penrose_iter_pinv(attn2, self.pinv_iterations)) @ (attn3 @ v)
        if self.residual:
            out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return out[:, -n:]


class TransLayer(nn.Module):
    def __init__(self, dim: int = 512):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, dim_head=dim // 8, heads=8, num_landmarks=dim // 2,
                                     pinv_iterations=6, residual=True, dropout=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """TransMIL's pyramid position encoding: depthwise 7x7 + 5x5 + 3x3 convolutions (and identity) over the
    tokens laid on an H x W grid; the class token passes through. x (B, 1 + H W, C) -> same."""

    def __init__(self, dim: int = 512):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b, _, c = x.shape
        cls_token, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, H, W)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """TransMIL (Shao et al., NeurIPS 2021) as in MambaMIL's harness (`_fc1`, `pos_layer`, `cls_token`,
    `layer1`, `layer2`, `norm`, `classifier`)."""
    scores_are_attention = False     # return_scores gives no per-instance score


    def __init__(self, in_dim: int = 1024, n_classes: int = 2, dropout: float = 0.0, act: str = "relu",
                 dim: int = 512):
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        self._fc1 = _fc(in_dim, dim, act, dropout)
        self.pos_layer = PPEG(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        self.layer1 = TransLayer(dim)
        self.layer2 = TransLayer(dim)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)
        xavier_init(self)

    def forward(self, x: torch.Tensor, return_scores: bool = False):
        if return_scores:
            raise NotImplementedError("TransMIL has no per-instance attention score for heatmaps; use MambaMIL "
                                      "or ABMIL")
        h = self._fc1(as_bag(x, self.in_dim, "TransMIL", self._fc1[0].weight.dtype))
        n = h.shape[1]
        side = int(math.ceil(math.sqrt(n)))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)        # pad to a square by repeating the first tokens
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.layer1(h)
        h = self.pos_layer(h, side, side)
        h = self.layer2(h)
        return self.classifier(self.norm(h)[:, 0])


# --------------------------------------------------------------------------------------------------

def build_mil_model(name: str, in_dim: int, n_classes: int, **kwargs) -> nn.Module:
    """By MambaMIL's model_type names (mamba_mil, mean_mil, max_mil, att_mil, trans_mil) or ours."""
    table = {"mamba_mil": MambaMIL, "mambamil": MambaMIL, "mean_mil": MeanMIL, "mean": MeanMIL,
             "max_mil": MaxMIL, "max": MaxMIL, "att_mil": ABMIL, "abmil": ABMIL, "trans_mil": TransMIL,
             "transmil": TransMIL}
    if name not in table:
        raise ValueError(f"unknown MIL model {name!r}; expected one of {', '.join(sorted(table))}")
    return table[name](in_dim=in_dim, n_classes=n_classes, **kwargs)
