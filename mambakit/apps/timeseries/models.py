"""Forecasting models: S-Mamba and, under the same protocol, the iTransformer and DLinear baselines.

Every model maps a lookback window to a forecast, `model(x, x_mark) -> (B, pred_len, N)`, with
x (B, seq_len, N) the (globally scaled) series and x_mark (B, seq_len, F) its calendar features (F may be 0;
DLinear ignores them).

S-Mamba (Wang et al. 2024, wzhwzhwzh0921/S-D-Mamba `model/S_Mamba.py`, `layers/Mamba_EncDec.py`) and
iTransformer (Liu et al. 2024) share the inverted layout: each variate's whole lookback is one token,

    x -> instance norm (per series mean/std, no affine) -> Linear(seq_len -> d_model) per variate, with the
    F calendar features appended as F more tokens -> encoder layers -> LayerNorm -> Linear(d_model ->
    pred_len) -> drop the calendar tokens -> de-normalise,

and differ only in the token mixer of the encoder layer:

    S-Mamba:       x + Mamba_f(x) + flip(Mamba_b(flip(x)))     (two independent Mamba modules, summed)
    iTransformer:  x + dropout(MultiHeadAttention(x))
    then both:     LayerNorm -> x + dropout(W2 dropout(act(W1 x))) -> LayerNorm

Upstream's FFN is a pair of 1x1 Conv1d; here it is the equivalent pair of Linear layers (same function,
same initial distribution; `convert.py` reshapes upstream weights). Upstream's S-Mamba encoder layer also
builds three modules it never uses (`man`, `man2`, `a`); they are not built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DLinearConfig, ITransformerConfig, ModelConfig, SMambaConfig

__all__ = [
    "SMambaConfig", "ITransformerConfig", "DLinearConfig", "ModelConfig", "build_model",
    "SMamba", "ITransformer", "DLinear", "InvertedEncoderLayer", "InvertedEncoder", "InvertedEmbedding",
    "MultiHeadAttention", "SeriesDecomposition", "instance_normalize", "instance_denormalize",
]


def build_model(cfg: ModelConfig, seq_len: int, pred_len: int, n_variates: int) -> nn.Module:
    """The model a config names, for windows of `seq_len` -> `pred_len` over `n_variates` series."""
    if isinstance(cfg, SMambaConfig):
        return SMamba(seq_len, pred_len, d_model=cfg.d_model, d_ff=cfg.d_ff, e_layers=cfg.e_layers,
                      d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, dropout=cfg.dropout,
                      activation=cfg.activation, use_norm=cfg.use_norm)
    if isinstance(cfg, ITransformerConfig):
        return ITransformer(seq_len, pred_len, d_model=cfg.d_model, d_ff=cfg.d_ff, e_layers=cfg.e_layers,
                            n_heads=cfg.n_heads, dropout=cfg.dropout, activation=cfg.activation,
                            use_norm=cfg.use_norm)
    if isinstance(cfg, DLinearConfig):
        return DLinear(seq_len, pred_len, n_variates, moving_avg=cfg.moving_avg, individual=cfg.individual)
    raise TypeError(f"unknown model config {type(cfg).__name__}")


# --------------------------------------------------------------------------------------------------
# shared parts

def instance_normalize(x: torch.Tensor, eps: float = 1e-5):
    """Non-stationary-Transformer normalisation over time: x (B, L, N) -> (x - mean) / std, mean, std.

    mean is detached (as upstream); std = sqrt(population var + eps) is not. No learnable affine."""
    mean = x.mean(dim=1, keepdim=True).detach()
    x = x - mean
    std = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + eps)
    return x / std, mean, std


def instance_denormalize(y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The inverse of `instance_normalize` for y (B, H, N) with the lookback's mean / std (B, 1, N)."""
    return y * std + mean


class InvertedEmbedding(nn.Module):
    """Each variate's lookback (and each calendar feature's) becomes one token: (B, L, N), (B, L, F) ->
    (B, N + F, d_model) via one shared Linear(L -> d_model), then dropout."""

    def __init__(self, seq_len: int, d_model: int, dropout: float = 0.1):
        super().__init__()
        self.value_embedding = nn.Linear(seq_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, x_mark: torch.Tensor | None = None) -> torch.Tensor:
        tokens = x.transpose(1, 2)
        if x_mark is not None and x_mark.shape[-1] > 0:
            tokens = torch.cat([tokens, x_mark.transpose(1, 2).to(tokens.dtype)], dim=1)
        return self.dropout(self.value_embedding(tokens))


class InvertedEncoderLayer(nn.Module):
    """x -> norm1(x + [dropout](mixer(x))) -> norm2(x + FFN(x)); tokens are variates, (B, T, d_model).

    `mixer_dropout`: iTransformer applies dropout to the attention output; S-Mamba adds the Mamba output
    without dropout. Both apply dropout inside and after the FFN."""

    def __init__(self, mixer: nn.Module, d_model: int, d_ff: int, dropout: float = 0.1,
                 activation: str = "gelu", mixer_dropout: bool = True):
        super().__init__()
        self.mixer = mixer
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = {"gelu": F.gelu, "relu": F.relu}[activation]
        self.mixer_dropout = mixer_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mixer(x)
        x = x + (self.dropout(mixed) if self.mixer_dropout else mixed)
        x = self.norm1(x)
        y = self.dropout(self.activation(self.linear1(x)))
        y = self.dropout(self.linear2(y))
        return self.norm2(x + y)


class InvertedEncoder(nn.Module):
    def __init__(self, layers: list[nn.Module], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class InvertedForecaster(nn.Module):
    """The body S-Mamba and iTransformer share; subclasses only choose the token mixer."""

    def __init__(self, seq_len: int, pred_len: int, d_model: int, layers: list[nn.Module], dropout: float,
                 use_norm: bool):
        super().__init__()
        self.seq_len, self.pred_len, self.use_norm = seq_len, pred_len, use_norm
        self.enc_embedding = InvertedEmbedding(seq_len, d_model, dropout)
        self.encoder = InvertedEncoder(layers, d_model)
        self.projector = nn.Linear(d_model, pred_len)

    def forward(self, x: torch.Tensor, x_mark: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, seq_len, N), x_mark (B, seq_len, F) or None -> (B, pred_len, N)."""
        if x.dim() != 3 or x.shape[1] != self.seq_len:
            raise ValueError(f"{type(self).__name__}: expected x of shape (batch, seq_len={self.seq_len}, "
                             f"variates), got {tuple(x.shape)}")
        n = x.shape[-1]
        if self.use_norm:
            x, mean, std = instance_normalize(x)
        tokens = self.encoder(self.enc_embedding(x, x_mark))
        y = self.projector(tokens).transpose(1, 2)[:, :, :n]       # drop the calendar tokens
        if self.use_norm:
            y = instance_denormalize(y, mean, std)
        return y


# --------------------------------------------------------------------------------------------------
# S-Mamba

def bidirectional_mamba(d_model: int, d_state: int, d_conv: int, expand: int) -> nn.Module:
    """Two independent full Mamba-1 mixers over the identity and the reversed token order, outputs summed:
    Mamba_f(x) + flip(Mamba_b(flip(x))). The core's per-order mixer, as upstream's `attention` /
    `attention_r` pair (mixers.0 / mixers.1)."""
    from mambakit.core import PerOrderMamba

    return PerOrderMamba(d_model, orders=("identity", "flip"), merge="sum", d_state=d_state, d_conv=d_conv,
                         expand=expand)


class SMamba(InvertedForecaster):
    """S-Mamba: inverted tokens mixed by a bidirectional (forward + reversed, summed) Mamba."""

    def __init__(self, seq_len: int, pred_len: int, d_model: int = 512, d_ff: int = 2048, e_layers: int = 2,
                 d_state: int = 32, d_conv: int = 2, expand: int = 1, dropout: float = 0.1,
                 activation: str = "gelu", use_norm: bool = True):
        layers = [InvertedEncoderLayer(bidirectional_mamba(d_model, d_state, d_conv, expand), d_model, d_ff,
                                       dropout, activation, mixer_dropout=False) for _ in range(e_layers)]
        super().__init__(seq_len, pred_len, d_model, layers, dropout, use_norm)


# --------------------------------------------------------------------------------------------------
# iTransformer

class MultiHeadAttention(nn.Module):
    """Full (non-causal) multi-head self-attention over tokens with dropout on the attention weights;
    parameter names as upstream's `AttentionLayer`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)
        self.attention_dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, -1).transpose(1, 2)
                   for proj in (self.query_projection, self.key_projection, self.value_projection))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.out_projection(out.transpose(1, 2).reshape(b, t, -1))


class ITransformer(InvertedForecaster):
    """iTransformer: inverted tokens mixed by full self-attention."""

    def __init__(self, seq_len: int, pred_len: int, d_model: int = 512, d_ff: int = 2048, e_layers: int = 2,
                 n_heads: int = 8, dropout: float = 0.1, activation: str = "gelu", use_norm: bool = True):
        layers = [InvertedEncoderLayer(MultiHeadAttention(d_model, n_heads, dropout), d_model, d_ff, dropout,
                                       activation, mixer_dropout=True) for _ in range(e_layers)]
        super().__init__(seq_len, pred_len, d_model, layers, dropout, use_norm)


# --------------------------------------------------------------------------------------------------
# DLinear

class SeriesDecomposition(nn.Module):
    """x (B, L, N) -> (remainder, trend): trend is a centred moving average over time with the ends padded
    by repeating the first / last value (Autoformer's `series_decomp`)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor):
        pad = (self.kernel_size - 1) // 2
        padded = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
        trend = F.avg_pool1d(padded.transpose(1, 2), self.kernel_size, stride=1).transpose(1, 2)
        return x - trend, trend


class DLinear(nn.Module):
    """DLinear: Linear(seasonal) + Linear(trend) over time, weights initialised to 1/seq_len (TSLib)."""

    def __init__(self, seq_len: int, pred_len: int, n_variates: int, moving_avg: int = 25,
                 individual: bool = False):
        super().__init__()
        self.seq_len, self.pred_len, self.n_variates, self.individual = seq_len, pred_len, n_variates, individual
        self.decomposition = SeriesDecomposition(moving_avg)
        # Upstream's parameter names: one shared Linear each, or a ModuleList of one per variate.
        if individual:
            self.Linear_Seasonal = nn.ModuleList(self._averaging_linear() for _ in range(n_variates))
            self.Linear_Trend = nn.ModuleList(self._averaging_linear() for _ in range(n_variates))
        else:
            self.Linear_Seasonal = self._averaging_linear()
            self.Linear_Trend = self._averaging_linear()

    def _averaging_linear(self) -> nn.Linear:
        layer = nn.Linear(self.seq_len, self.pred_len)
        with torch.no_grad():
            layer.weight.fill_(1.0 / self.seq_len)
        return layer

    def forward(self, x: torch.Tensor, x_mark: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, seq_len, N) -> (B, pred_len, N); x_mark is ignored."""
        if x.dim() != 3 or x.shape[1] != self.seq_len:
            raise ValueError(f"DLinear: expected x of shape (batch, seq_len={self.seq_len}, variates), "
                             f"got {tuple(x.shape)}")
        seasonal, trend = (part.transpose(1, 2) for part in self.decomposition(x))     # (B, N, L)
        if self.individual:
            if x.shape[-1] != self.n_variates:
                raise ValueError(f"DLinear(individual=True) was built for {self.n_variates} variates, "
                                 f"got {x.shape[-1]}")
            out = torch.stack([self.Linear_Seasonal[i](seasonal[:, i]) + self.Linear_Trend[i](trend[:, i])
                               for i in range(self.n_variates)], dim=1)
        else:
            out = self.Linear_Seasonal(seasonal) + self.Linear_Trend(trend)
        return out.transpose(1, 2)
