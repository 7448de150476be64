"""Point Cloud Mamba's convolution blocks, classification head and part-segmentation decoder / head.

Module and parameter names follow SkyworkAI/PointCloudMamba (PointMLP's `ConvBNReLU1D` / `ConvBNReLURes1D`,
openpoints' `ClsHead` / `SegHead`, PCM's `PointMambaPartDecoder`), so that an upstream state_dict loads by
stripping prefixes (see convert.py).

Layout: everything here is channels-last. The 1x1 convolutions keep their Conv1d parameters (weight
(out, in, 1), so upstream checkpoints load strictly) but run as a matrix product on the features flattened to
(M, C), followed by BatchNorm1d on that 2-D tensor: BatchNorm over (M, C) averages over the same M = B * L
values per channel as over (B, C, L), with the same unbiased running variance, momentum and counter, and it
is two to three times faster on the CPU than mkldnn's convolution + channel-first batch norm. Per-point
features stay (B, N, C) (or (B, S, k, C) for groups) from module to module, so nothing is transposed between
layers. `SegHead.forward` and `PointMambaPartDecoder.forward` keep upstream's (B, C, N) interface;
their `forward_last` methods are the channels-last paths the models use.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import three_nn_interpolate

__all__ = ["pointwise_conv", "ConvBNReLU1D", "ConvBNReLURes1D", "PosExtraction", "PointNetFeaturePropagation", "ClsHead",
           "SegHead", "PointMambaPartDecoder"]


def pointwise_conv(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-1 Conv1d / Conv2d (groups 1) applied to channels-last features x (..., C_in) -> (..., C_out):
    the same numbers as the convolution on the channel-first tensor, computed by one matrix product."""
    if conv.groups != 1 or any(k != 1 for k in conv.kernel_size) or any(s != 1 for s in conv.stride):
        raise ValueError(f"pointwise_conv: needs a 1x1 convolution with groups 1 and stride 1, got {conv}")
    if x.shape[-1] != conv.in_channels:
        raise ValueError(f"pointwise_conv: input has {x.shape[-1]} channels in its last axis, the convolution "
                         f"expects {conv.in_channels} ({conv})")
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _pointwise_sequence(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A Sequential of 1x1 convolutions, BatchNorm1d, activations and dropout on channels-last x (..., C).
    BatchNorm sees the features flattened to (M, C): the statistics over all leading positions that
    BatchNorm1d takes over (B, C, L)."""
    lead = x.shape[:-1]
    x = _pointwise_flat(layers, x.reshape(-1, x.shape[-1]))
    return x.view(*lead, x.shape[-1])


def _pointwise_flat(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`_pointwise_sequence` on (M, C); nested Sequentials (SegHead's blocks) are walked through."""
    for layer in layers:
        if isinstance(layer, nn.Sequential):
            x = _pointwise_flat(layer, x)
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            x = pointwise_conv(layer, x)
        else:
            x = layer(x)
    return x


class ConvBNReLU1D(nn.Module):
    """1x1 Conv1d -> BatchNorm1d -> ReLU on channels-last features (..., C_in) -> (..., C_out); parameters
    under `net` (upstream's Conv1d / BatchNorm1d, applied as in the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=bias),
                                 nn.BatchNorm1d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pointwise_sequence(self.net, x)


class ConvBNReLURes1D(nn.Module):
    """PointMLP's residual block: relu(BN(conv(relu(BN(conv(x))))) + x) on channels-last (..., C); groups=1
    as in PCM."""

    def __init__(self, channels: int, res_expansion: float = 1.0, bias: bool = True):
        super().__init__()
        hidden = int(channels * res_expansion)
        self.net1 = nn.Sequential(nn.Conv1d(channels, hidden, kernel_size=1, bias=bias), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True))
        self.net2 = nn.Sequential(nn.Conv1d(hidden, channels, kernel_size=1, bias=bias), nn.BatchNorm1d(channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(_pointwise_sequence(self.net2, _pointwise_sequence(self.net1, x)) + x)


class PosExtraction(nn.Module):
    """`blocks` residual blocks on channels-last (..., C) (PointMLP's post-grouping extraction; Identity in PCM's encoder)."""

    def __init__(self, channels: int, blocks: int = 1, res_expansion: float = 1.0, bias: bool = True):
        super().__init__()
        self.operation = nn.Sequential(*[ConvBNReLURes1D(channels, res_expansion, bias) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.operation(x)


class PointNetFeaturePropagation(nn.Module):
    """PointMLP's feature propagation: coarse features carried to the fine points by three-NN inverse squared
    distance weights, concatenated after the fine level's skip features, fused (ConvBNReLU1D) and refined
    (`blocks` residual blocks)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int = 1, res_expansion: float = 1.0,
                 bias: bool = True):
        super().__init__()
        self.fuse = ConvBNReLU1D(in_channels, out_channels, bias=bias)
        self.extraction = (PosExtraction(out_channels, blocks, res_expansion, bias) if blocks > 0
                           else nn.Identity())

    def forward(self, fine_pos: torch.Tensor, coarse_pos: torch.Tensor, fine_feats: torch.Tensor | None,
                coarse_feats: torch.Tensor) -> torch.Tensor:
        """fine_pos (B, N, 3), coarse_pos (B, S, 3), fine_feats (B, N, C1) or None, coarse_feats (B, S, C2)
        -> (B, N, out_channels)."""
        x = three_nn_interpolate(fine_pos, coarse_pos, coarse_feats)
        if fine_feats is not None:
            x = torch.cat([fine_feats, x], dim=-1)
        return self.extraction(self.fuse(x))


def _linear_block(in_features: int, out_features: int, norm: bool) -> nn.Sequential:
    """openpoints' create_linearblock: Linear (no bias before a norm) [-> BatchNorm1d -> ReLU]."""
    if not norm:
        return nn.Sequential(nn.Linear(in_features, out_features, bias=True))
    return nn.Sequential(nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features),
                         nn.ReLU(inplace=True))


def _conv_block(in_channels: int, out_channels: int, norm: bool) -> nn.Sequential:
    """openpoints' create_convblock1d with kernel 1: Conv1d (no bias before a norm) [-> BatchNorm1d -> ReLU]."""
    if not norm:
        return nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=True))
    return nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=False),
                         nn.BatchNorm1d(out_channels), nn.ReLU(inplace=True))


class ClsHead(nn.Module):
    """openpoints' ClsHead with bn1d: [Linear -> BN -> ReLU -> Dropout] per hidden width, then Linear.
    (B, in_channels) -> (B, n_classes). Parameters `head.{0,2,4}.*` for mlps [512, 256]."""

    def __init__(self, in_channels: int, n_classes: int, mlps: Sequence[int] = (512, 256), dropout: float = 0.5):
        super().__init__()
        widths = [in_channels, *mlps, n_classes]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers.append(_linear_block(a, b, norm=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(_linear_block(widths[-2], widths[-1], norm=False))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class SegHead(nn.Module):
    """openpoints' SegHead as PCM's ShapeNetPart config uses it (global_feat "max,avg", bn, mlps None):
    per-point features concatenated with their max and mean over the points, then
    Conv1d -> BN -> ReLU -> Dropout -> Conv1d. forward: (B, C, N) -> (B, n_classes, N) as upstream;
    forward_last: (B, N, C) -> (B, N, n_classes), what the model uses."""

    def __init__(self, in_channels: int, n_classes: int, dropout: float = 0.5):
        super().__init__()
        width = 3 * in_channels
        layers: list[nn.Module] = [_conv_block(width, width, norm=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(_conv_block(width, n_classes, norm=False))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_last(x.transpose(1, 2)).transpose(1, 2)

    def forward_last(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=-1)
        return _pointwise_sequence(self.head, torch.cat([x, pooled.expand(-1, n, -1)], dim=-1))


class PointMambaPartDecoder(nn.Module):
    """PCM's ShapeNetPart decoder (`PointMambaPartDecoder` with decoder mamba_blocks [0, 0, 0, 0], as both
    published configs): feature propagation from the coarsest stage back to the input points with skip
    connections, then each point gets a global context (max-pooled features of every level, mapped and fused)
    and a shape-category embedding (one-hot -> two ConvBNReLU1D).

    encoder_channels: channels of the embedding and of each stage's output, finest first
    ([384, 384, 384, 768, 768] for PCM). Output of forward: (B, out_channels, N) as upstream, of forward_last:
    (B, N, out_channels); out_channels = encoder_channels[1] + gmp_dim + cls_dim.
    """

    def __init__(self, encoder_channels: Sequence[int], n_categories: int, decoder_blocks: Sequence[int] | None = None,
                 gmp_dim: int = 64, cls_dim: int = 64):
        super().__init__()
        en_dims = list(encoder_channels)[::-1]                   # coarsest first
        de_dims = [en_dims[0]] + en_dims[1:-1] + [en_dims[-2]]   # upstream's decoder_channel_list, derived
        # (upstream: decoder_channel_list = [768, 384, 384, 384] for [384, 384, 384, 768, 768]: the next
        # finer encoder width at each level, the finest stage's width at the input points)
        blocks = list(decoder_blocks) if decoder_blocks is not None else [1] * (len(en_dims) - 1)
        if len(blocks) != len(en_dims) - 1:
            raise ValueError(f"PointMambaPartDecoder: decoder_blocks needs {len(en_dims) - 1} entries (one per "
                             f"stage), got {blocks}")
        self.n_categories = n_categories
        self.decode_list = nn.ModuleList(
            PointNetFeaturePropagation(de_dims[i] + en_dims[i + 1], de_dims[i + 1], blocks=blocks[i], bias=True)
            for i in range(len(en_dims) - 1))
        self.cls_map = nn.Sequential(ConvBNReLU1D(n_categories, cls_dim, bias=True),
                                     ConvBNReLU1D(cls_dim, cls_dim, bias=True))
        self.gmp_map_list = nn.ModuleList(ConvBNReLU1D(c, gmp_dim, bias=True) for c in en_dims)
        self.gmp_map_end = ConvBNReLU1D(gmp_dim * len(en_dims), gmp_dim, bias=True)
        self.out_channels = de_dims[-1] + gmp_dim + cls_dim

    def forward(self, pos_list: Sequence[torch.Tensor], feat_list: Sequence[torch.Tensor],
                category: torch.Tensor) -> torch.Tensor:
        """pos_list[i] (B, N_i, 3) and feat_list[i] (B, N_i, C_i), finest (the input points) first;
        category (B,) int64 -> (B, out_channels, N_0)."""
        return self.forward_last(pos_list, feat_list, category).transpose(1, 2)

    def forward_last(self, pos_list: Sequence[torch.Tensor], feat_list: Sequence[torch.Tensor],
                     category: torch.Tensor) -> torch.Tensor:
        """As forward, channels-last: -> (B, N_0, out_channels)."""
        pos_list, feat_list = list(pos_list)[::-1], list(feat_list)[::-1]
        x = feat_list[0]
        for i, fp in enumerate(self.decode_list):
            x = fp(pos_list[i + 1], pos_list[i], feat_list[i + 1], x)
        n = x.shape[1]
        pooled = [m(f).amax(dim=1) for m, f in zip(self.gmp_map_list, feat_list)]
        context = self.gmp_map_end(torch.cat(pooled, dim=-1))                      # (B, gmp_dim)
        one_hot = F.one_hot(category, self.n_categories).to(x.dtype)               # (B, n_categories)
        cls_token = self.cls_map(one_hot)                                          # (B, cls_dim)
        return torch.cat([x, context[:, None].expand(-1, n, -1), cls_token[:, None].expand(-1, n, -1)], dim=-1)
