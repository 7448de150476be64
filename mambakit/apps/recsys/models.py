"""Sequential recommenders in one harness: Mamba4Rec, TiM4Rec, SASRec, GRU4Rec.

Every model maps a batch of right-padded item sequences to one vector per sequence, read at the last valid
position, and scores all items by dot product with the item embedding table (RecBole's
`full_sort_predict`); training is cross-entropy over all items (RecBole's `loss_type: CE`, padding column
included, as upstream). Parameter names follow the upstream code (RecBole 1.2.1's SASRec / GRU4Rec,
chengkai-liu/Mamba4Rec, AlwaysFHao/TiM4Rec), so their state dicts load by name.

    model = build_model(Mamba4RecConfig(), n_items=1350, max_len=50)
    h = model(item_seq, item_seq_len)                  # (b, hidden)
    scores = model.full_sort_scores(h)                 # (b, n_items)

What is upstream-exact and what is not is listed in the app README.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from mambakit.core import Mamba, RMSNormGated, ssd_scan

from .config import GRU4RecConfig, Mamba4RecConfig, ModelConfig, SASRecConfig, TiM4RecConfig
from .data import Vocabulary

__all__ = [
    "SequentialRecommender", "Mamba4Rec", "TiM4Rec", "TiSSD", "SASRec", "GRU4Rec", "build_model",
    "attach_vocabulary", "stored_vocabulary", "VOCAB_BUFFER",
]


# --------------------------------------------------------------------------------------------------
# shared parts

class SequentialRecommender(nn.Module):
    """Base class: `forward(item_seq, item_seq_len, time_seq=None) -> (b, hidden)`; `full_sort_scores`.

    item_seq: (b, T) int64, right-padded with 0; item_seq_len: (b,) in [1, T]; time_seq: (b, T) float64 unix
    seconds (models with `uses_time`). `fixed_length` models need T == max_len.
    """
    uses_time: bool = False
    fixed_length: bool = False

    def __init__(self, n_items: int, max_len: int):
        super().__init__()
        if n_items < 2:
            raise ValueError(f"n_items must count padding plus at least one item, got {n_items}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.n_items = n_items
        self.max_len = max_len

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, time_seq: torch.Tensor | None = None,
                scores: bool = False) -> torch.Tensor:
        """(b, hidden) sequence vectors, or with `scores=True` the (b, n_items) scores of every item."""
        self.check_inputs(item_seq, item_seq_len, time_seq)
        h = self.encode(item_seq, item_seq_len, time_seq)
        return self.full_sort_scores(h) if scores else h

    def encode(self, item_seq, item_seq_len, time_seq=None) -> torch.Tensor:
        raise NotImplementedError

    def full_sort_scores(self, seq_output: torch.Tensor) -> torch.Tensor:
        """(b, hidden) -> (b, n_items): dot products with every item embedding (padding included)."""
        return seq_output @ self.item_embedding.weight.t()

    def check_inputs(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, time_seq=None) -> None:
        name = type(self).__name__
        if item_seq.dim() != 2 or item_seq.dtype != torch.long:
            raise ValueError(f"{name}: item_seq must be int64 (batch, length), got {item_seq.dtype} "
                             f"{tuple(item_seq.shape)}")
        b, T = item_seq.shape
        if item_seq_len.shape != (b,):
            raise ValueError(f"{name}: item_seq_len must have shape ({b},), got {tuple(item_seq_len.shape)}")
        if b and (int(item_seq_len.min()) < 1 or int(item_seq_len.max()) > T):
            raise ValueError(f"{name}: item_seq_len must lie in [1, {T}], got min {int(item_seq_len.min())} "
                             f"max {int(item_seq_len.max())}")
        if T > self.max_len or (self.fixed_length and T != self.max_len):
            need = f"exactly {self.max_len}" if self.fixed_length else f"at most {self.max_len}"
            raise ValueError(f"{name}: item_seq has length {T}, expected {need} (max_len)")
        if self.uses_time:
            if time_seq is None:
                raise ValueError(f"{name}: needs time_seq (batch, length) timestamps")
            if time_seq.shape != item_seq.shape:
                raise ValueError(f"{name}: time_seq has shape {tuple(time_seq.shape)}, expected {tuple(item_seq.shape)}")


def gather_last(output: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """(b, T, d) -> (b, d): the vector at position item_seq_len - 1 (RecBole's `gather_indexes`)."""
    index = (item_seq_len - 1).view(-1, 1, 1).expand(-1, 1, output.shape[-1])
    return output.gather(1, index).squeeze(1)


def _recbole_init(module: nn.Module, std: float = 0.02) -> None:
    """RecBole's `_init_weights` (SASRec, Mamba4Rec, TiM4Rec): Linear and Embedding weights N(0, std), Linear
    biases 0, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class FeedForward(nn.Module):
    """Position-wise FFN with residual and LayerNorm: LN(x + drop(W2 drop(act(W1 x))))."""

    def __init__(self, d_model: int, inner_size: int, dropout: float, activation: nn.Module, eps: float,
                 names: tuple[str, str, str] = ("w_1", "w_2", "LayerNorm")):
        super().__init__()
        self._names = names
        setattr(self, names[0], nn.Linear(d_model, inner_size))
        setattr(self, names[1], nn.Linear(inner_size, d_model))
        setattr(self, names[2], nn.LayerNorm(d_model, eps=eps))
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2, norm = (getattr(self, n) for n in self._names)
        h = self.dropout(self.activation(fc1(x)))
        h = self.dropout(fc2(h))
        return norm(h + x)


# --------------------------------------------------------------------------------------------------
# Mamba4Rec

class MambaLayer(nn.Module):
    """Mamba -> dropout -> LayerNorm (residual only when the model has more than one layer) -> FFN."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.mamba = Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, nn.GELU(), 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.mamba(x))
        h = self.LayerNorm(h) if self.num_layers == 1 else self.LayerNorm(h + x)
        return self.ffn(h)


class Mamba4Rec(SequentialRecommender):
    """Mamba4Rec (Liu et al. 2024): item embedding -> dropout -> LayerNorm -> Mamba layers; no position
    embedding; the last valid position scores all items."""

    def __init__(self, config: Mamba4RecConfig, n_items: int, max_len: int):
        super().__init__(n_items, max_len)
        self.config = config
        d = config.hidden_size
        self.item_embedding = nn.Embedding(n_items, d, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.dropout = nn.Dropout(config.dropout_prob)
        self.mamba_layers = nn.ModuleList([
            MambaLayer(d, config.d_state, config.d_conv, config.expand, config.dropout_prob, config.num_layers)
            for _ in range(config.num_layers)])
        if config.mixer_init == "upstream":
            self.apply(_recbole_init)
        else:
            mixers = {id(m) for layer in self.mamba_layers for m in layer.mamba.modules()}
            for module in self.modules():
                if id(module) not in mixers:
                    _recbole_init(module)

    def encode(self, item_seq, item_seq_len, time_seq=None):
        h = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        for layer in self.mamba_layers:
            h = layer(h)
        return gather_last(h, item_seq_len)


# --------------------------------------------------------------------------------------------------
# TiM4Rec

def _conv_activation(name: str, n_heads: int) -> nn.Module:
    if name == "auto":
        name = "silu" if n_heads % 8 == 0 else "hardswish"
    return nn.SiLU() if name == "silu" else nn.Hardswish()


class TiSSD(nn.Module):
    """TiM4Rec's time-aware SSD mixer on core's `ssd_scan` (one group of B/C, gated RMSNorm, no z in the scan).

    in_proj splits into [z, xBC, dt]; xBC goes through a depthwise causal conv; the time-gap signal
    time_diff (b, h, max_len) is scaled by an MLP over the sequence axis (hence tied to max_len), passed
    through two per-head depthwise causal convs, and multiplies dt before dt_bias and softplus (core's
    `dt_multiplier`). The layer also returns the next layer's time signal:
    LN_L(g * time_diff + (1 - g) * time_dt) with the gate g = sigmoid(Linear_L(time_diff)).
    """

    def __init__(self, d_model: int, seq_len: int, d_state: int = 32, d_conv: int = 4, expand: int = 2,
                 head_dim: int = 32, chunk_size: int = 32, time_dropout: float = 0.0, is_time: bool = True,
                 p2p_residual: bool = False, norm_eps: float = 1e-12, conv_activation: str = "auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 A_init_range: tuple[float, float] = (1.0, 16.0)):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.seq_len = d_model, d_state, d_conv, seq_len
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(f"TiSSD: d_inner = expand * d_model = {self.d_inner} is not divisible by "
                             f"head_dim={head_dim}")
        if d_conv < 1:
            raise ValueError(f"TiSSD: d_conv must be >= 1, got {d_conv}")
        self.head_dim = head_dim
        self.n_heads = self.d_inner // head_dim
        self.chunk_size = chunk_size
        self.is_time = is_time
        h = self.n_heads
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + h, bias=True)
        conv_dim = self.d_inner + 2 * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)
        self.act = _conv_activation(conv_activation, h)
        if is_time:
            self.conv1d4time_1 = nn.Conv1d(h, h, d_conv, groups=h, padding=d_conv - 1, bias=True)
            self.conv1d4time_2 = nn.Conv1d(h, h, d_conv, groups=h, padding=d_conv - 1, bias=True)
            self.mlp4time_scale = nn.Sequential(
                nn.Dropout(time_dropout), nn.Linear(seq_len, seq_len), nn.SiLU(), nn.Linear(seq_len, seq_len))
            self.time_gate_residual = nn.Sequential(
                nn.Dropout(time_dropout), nn.Linear(seq_len, seq_len if p2p_residual else 1), nn.Sigmoid())
            self.time_layer_norm = nn.LayerNorm(seq_len, eps=norm_eps)
        # Mamba-2's dt / A / D initialisation, as upstream TiSSD.
        dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))     # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(h).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(h))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = RMSNormGated(self.d_inner, eps=norm_eps, norm_before_gate=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=True)

    def _causal(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        """Depthwise causal conv over the last axis of (b, c, L), then the activation."""
        return self.act(conv(x)[..., :x.shape[-1]])

    def forward(self, u: torch.Tensor, time_diff: torch.Tensor | None = None):
        """u: (b, L, d_model); time_diff: (b, n_heads, L) when is_time. Returns (out (b, L, d_model),
        next time signal (b, n_heads, L) or None)."""
        b, L, _ = u.shape
        if self.is_time and (time_diff is None or time_diff.shape != (b, self.n_heads, L)):
            got = None if time_diff is None else tuple(time_diff.shape)
            raise ValueError(f"TiSSD: time_diff must have shape ({b}, {self.n_heads}, {L}), got {got}")
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads],
                                 dim=-1)
        xBC = self._causal(self.conv1d, xBC.transpose(1, 2)).transpose(1, 2)
        time_dt = None
        if self.is_time:
            time_dt = time_diff * self.mlp4time_scale(time_diff)
            time_dt = self._causal(self.conv1d4time_1, time_dt)
            time_dt = self._causal(self.conv1d4time_2, time_dt).transpose(1, 2)          # (b, L, h)
        x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        y = ssd_scan(x.reshape(b, L, self.n_heads, self.head_dim), dt, A, B.unsqueeze(2), C.unsqueeze(2),
                     chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                     dt_multiplier=time_dt)
        out = self.out_proj(self.norm(y.reshape(b, L, self.d_inner), z))
        if not self.is_time:
            return out, None
        gate = self.time_gate_residual(time_diff)
        next_time = self.time_layer_norm(gate * time_diff + (1 - gate) * time_dt.transpose(1, 2))
        return out, next_time


class TiSSDLayer(nn.Module):
    """TiSSD -> dropout -> LayerNorm (residual only with more than one layer) -> FFN (Hardswish, 4x)."""

    def __init__(self, config: TiM4RecConfig, seq_len: int):
        super().__init__()
        c = config
        self.num_layers = c.num_layers
        self.ssd = TiSSD(c.hidden_size, seq_len, c.d_state, c.d_conv, c.expand, c.head_dim, c.chunk_size,
                         c.time_dropout, c.is_time, c.p2p_residual, c.norm_eps, c.conv_activation)
        self.dropout = nn.Dropout(c.dropout_prob)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.is_ffn = c.is_ffn
        if c.is_ffn:
            # Upstream's FeedForward keeps its default eps 1e-12 whatever norm_eps is.
            self.ffn = FeedForward(c.hidden_size, 4 * c.hidden_size, c.dropout_prob, nn.Hardswish(), 1e-12,
                                   names=("fc1", "fc2", "layer_norm"))

    def forward(self, x, time_diff):
        h, time_diff = self.ssd(x, time_diff)
        h = self.layer_norm(self.dropout(h)) if self.num_layers == 1 else self.layer_norm(self.dropout(h) + x)
        return (self.ffn(h) if self.is_ffn else h), time_diff


class TiM4Rec(SequentialRecommender):
    """TiM4Rec (Fan et al. 2025): Mamba4Rec's layout on time-aware SSD layers.

    The time gaps of the input sequence, Δt_i = t_i - t_{i-1} (Δt_0 = 0), are dropped out, LayerNorm-ed over
    the max_len positions, repeated per head, and threaded through the layers (each returns the next one's)."""
    uses_time = True
    fixed_length = True

    def __init__(self, config: TiM4RecConfig, n_items: int, max_len: int):
        super().__init__(n_items, max_len)
        self.config = config
        d = config.hidden_size
        if (d * config.expand) % config.head_dim:
            raise ValueError(f"TiM4Rec: hidden_size * expand = {d * config.expand} is not divisible by "
                             f"head_dim={config.head_dim}")
        self.n_heads = d * config.expand // config.head_dim
        self.uses_time = config.is_time
        self.item_embedding = nn.Embedding(n_items, d, padding_idx=0)
        self.in_layer_norm = nn.LayerNorm(d, eps=config.norm_eps)
        if config.is_time:
            self.layer_norm_time = nn.LayerNorm(max_len, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout_prob)
        self.ssd_layers = nn.ModuleList([TiSSDLayer(config, max_len) for _ in range(config.num_layers)])
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        _recbole_init(module)
        if isinstance(module, nn.Conv1d) and self.config.kaiming_init:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                module.bias.data.zero_()

    def time_gaps(self, time_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """(b, L) timestamps -> (b, L) gaps in the model's dtype (computed in float64: unix seconds need it)."""
        t = time_seq.to(torch.float64)
        gaps = torch.cat([torch.zeros_like(t[:, :1]), t[:, 1:] - t[:, :-1]], dim=1)
        if self.config.mask_padding_gaps:
            valid = torch.arange(t.shape[1], device=t.device).unsqueeze(0) < item_seq_len.unsqueeze(1)
            gaps = torch.where(valid, gaps, torch.zeros_like(gaps))
        return gaps.to(self.item_embedding.weight.dtype)

    def encode(self, item_seq, item_seq_len, time_seq=None):
        h = self.in_layer_norm(self.dropout(self.item_embedding(item_seq)))
        time_diff = None
        if self.config.is_time:
            gaps = self.layer_norm_time(self.dropout(self.time_gaps(time_seq, item_seq_len)))
            time_diff = gaps.unsqueeze(1).expand(-1, self.n_heads, -1)
        for layer in self.ssd_layers:
            h, time_diff = layer(h, time_diff)
        return gather_last(h, item_seq_len)


# --------------------------------------------------------------------------------------------------
# SASRec

_ACTIVATIONS = {
    "gelu": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "relu": F.relu,
    "swish": lambda x: x * torch.sigmoid(x),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        return _ACTIVATIONS[self.name](x)


class MultiHeadAttention(nn.Module):
    """RecBole's MultiHeadAttention: scaled dot product with an additive mask, attention dropout, output
    projection, dropout, LayerNorm(+residual)."""

    def __init__(self, n_heads: int, hidden_size: int, hidden_dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"SASRec: hidden_size={hidden_size} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_size = hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = attn_dropout
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.out_dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, T, d = x.shape

        def heads(t):
            return t.view(b, T, self.n_heads, self.head_size).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0)
        h = self.out_dropout(self.dense(context.transpose(1, 2).reshape(b, T, d)))
        return self.LayerNorm(h + x)


class TransformerLayer(nn.Module):
    def __init__(self, c: SASRecConfig):
        super().__init__()
        self.multi_head_attention = MultiHeadAttention(c.n_heads, c.hidden_size, c.hidden_dropout_prob,
                                                       c.attn_dropout_prob, c.layer_norm_eps)
        # RecBole's FeedForward has no dropout after the activation, only after dense_2.
        self.feed_forward = _RecBoleFeedForward(c)

    def forward(self, x, mask):
        return self.feed_forward(self.multi_head_attention(x, mask))


class _RecBoleFeedForward(nn.Module):
    def __init__(self, c: SASRecConfig):
        super().__init__()
        self.dense_1 = nn.Linear(c.hidden_size, c.inner_size)
        self.act = _Activation(c.hidden_act)
        self.dense_2 = nn.Linear(c.inner_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x):
        h = self.dropout(self.dense_2(self.act(self.dense_1(x))))
        return self.LayerNorm(h + x)


class _Encoder(nn.Module):
    def __init__(self, c: SASRecConfig):
        super().__init__()
        self.layer = nn.ModuleList([TransformerLayer(c) for _ in range(c.n_layers)])

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class SASRec(SequentialRecommender):
    """SASRec (Kang & McAuley 2018) as RecBole 1.2.1 implements it: item + learned position embedding ->
    LayerNorm -> dropout -> causal Transformer (padding keys masked with -10000) -> last valid position."""

    def __init__(self, config: SASRecConfig, n_items: int, max_len: int):
        super().__init__(n_items, max_len)
        self.config = config
        d = config.hidden_size
        self.item_embedding = nn.Embedding(n_items, d, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, d)
        self.trm_encoder = _Encoder(config)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.apply(lambda m: _recbole_init(m, config.initializer_range))

    @staticmethod
    def attention_mask(item_seq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(b, 1, T, T) additive mask: 0 where a query may attend (causal, non-padding key), -10000 elsewhere."""
        keys = (item_seq != 0).unsqueeze(1).unsqueeze(2)                              # (b, 1, 1, T)
        allowed = torch.tril(keys.expand(-1, -1, item_seq.shape[1], -1))
        return torch.where(allowed, 0.0, -10000.0).to(dtype)

    def encode(self, item_seq, item_seq_len, time_seq=None):
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        x = self.item_embedding(item_seq) + self.position_embedding(positions).unsqueeze(0)
        x = self.dropout(self.LayerNorm(x))
        x = self.trm_encoder(x, self.attention_mask(item_seq, x.dtype))
        return gather_last(x, item_seq_len)


# --------------------------------------------------------------------------------------------------
# GRU4Rec

class GRU4Rec(SequentialRecommender):
    """GRU4Rec (Hidasi et al. 2016) as RecBole 1.2.1 implements it: embedding -> dropout -> GRU (no bias) ->
    Linear to the embedding size -> last valid position."""

    def __init__(self, config: GRU4RecConfig, n_items: int, max_len: int):
        super().__init__(n_items, max_len)
        self.config = config
        self.item_embedding = nn.Embedding(n_items, config.embedding_size, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout_prob)
        self.gru_layers = nn.GRU(config.embedding_size, config.hidden_size, num_layers=config.num_layers,
                                 bias=False, batch_first=True)
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        # RecBole: xavier_normal_ embeddings, xavier_uniform_ for the first GRU layer's weights; the rest keep
        # PyTorch's defaults.
        nn.init.xavier_normal_(self.item_embedding.weight)
        nn.init.xavier_uniform_(self.gru_layers.weight_hh_l0)
        nn.init.xavier_uniform_(self.gru_layers.weight_ih_l0)

    def encode(self, item_seq, item_seq_len, time_seq=None):
        out, _ = self.gru_layers(self.emb_dropout(self.item_embedding(item_seq)))
        return gather_last(self.dense(out), item_seq_len)


# --------------------------------------------------------------------------------------------------

_MODELS = {"mamba4rec": Mamba4Rec, "tim4rec": TiM4Rec, "sasrec": SASRec, "gru4rec": GRU4Rec}


def build_model(config: ModelConfig, n_items: int, max_len: int) -> SequentialRecommender:
    """The model a config names (`name:` mamba4rec, tim4rec, sasrec, gru4rec). n_items counts padding."""
    if config.name == "mostpop":
        raise ValueError("mostpop has no network to build: it scores items by training counts "
                         "(see mambakit.apps.recsys.app)")
    if config.name not in _MODELS:
        raise ValueError(f"unknown model {config.name!r}; expected one of {', '.join(_MODELS)} or mostpop")
    return _MODELS[config.name](config, n_items, max_len)


# --------------------------------------------------------------------------------------------------
# the item vocabulary travels inside the model (a uint8 buffer of JSON), so every checkpoint carries it

VOCAB_BUFFER = "item_vocabulary"


def attach_vocabulary(model: nn.Module, vocabulary: Vocabulary) -> nn.Module:
    """Store `vocabulary` in `model` as the buffer `item_vocabulary` (UTF-8 JSON bytes): it is saved with the
    weights, so `recommend` needs no data file and `eval` can tell whether a file is the training data."""
    if vocabulary.n_items != getattr(model, "n_items", vocabulary.n_items):
        raise ValueError(f"the vocabulary has {vocabulary.n_items} item ids (padding included), the model "
                         f"{model.n_items}")
    raw = bytearray(vocabulary.to_json().encode("utf-8"))
    model.register_buffer(VOCAB_BUFFER, torch.frombuffer(raw, dtype=torch.uint8).clone())
    return model


def stored_vocabulary(state: nn.Module | dict, source: str) -> Vocabulary | None:
    """The vocabulary stored in a model or a state dict (None when there is none: weights from before it was
    stored, or not a mambakit recommender)."""
    buffer = getattr(state, VOCAB_BUFFER, None) if isinstance(state, nn.Module) else state.get(VOCAB_BUFFER)
    if buffer is None:
        return None
    return Vocabulary.from_json(bytes(buffer.cpu().to(torch.uint8).numpy().tobytes()).decode("utf-8"), source)
