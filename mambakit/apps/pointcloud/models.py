"""Point Cloud Mamba (SkyworkAI/PointCloudMamba) for classification and part segmentation, and the app's model
factory.

The encoder (`PointMambaEncoder`) follows upstream's PCM.py with the published configs
(cfgs/{modelnet40ply2048,scanobjectnn,shapenetpart}/PCM*.yaml):

    embedding  ConvBNReLU1D(in_channels -> embed_dim)
    4 stages   LocalGrouper   FPS to N / reducer (no FPS when reducer is 1), indices sorted so the current
                              serialization order survives; kNN (k=12); "anchor" normalisation: the
                              neighbours (features ++ xyz) minus their centre, divided by one std per cloud
                              (over all its groups, neighbours and channels, unbiased), times alpha plus beta;
                              then concatenated with the repeated centre feature (2C + 3 channels)
               PreExtraction  ConvBNReLU1D + ConvBNReLURes1D blocks over each group, max over the k neighbours
               Mamba layers   per layer: re-sort points / features / residual when the layer's order differs
                              from the current one (the order is never undone), add Linear(3 -> C)(xyz), put
                              the order's 6 prompt tokens (Embedding(n_orders * 6, 384) projected by the
                              stage's Linear(384 -> C)) before and after the sequence and the residual, run
                              Add -> RMSNorm -> bidirectional Mamba (forward + flipped backward, summed),
                              strip the prompts
    max pool over the points of the last stage's mixer output (upstream pools the mixer output, not the sum
    with the residual; so do we)

Classification: `PointCloudMamba` = encoder + ClsHead([512, 256], BN, dropout 0.5). Part segmentation:
`PointCloudMambaPartSeg` = encoder (reducers [2, 2, 2, 2] as the ShapeNetPart configs) + PCM's part decoder
+ SegHead. Module and parameter names are upstream's (`encoder.*`, `prediction.head.*`; `encoder.*`,
`decoder.*`, `head.head.*`), so published checkpoints load by stripping prefixes (convert.py).

Serialization uses core's `PointOrder` (grid 0.02, Pointcept's batch-wide adaptive depth for hilbert / z,
like upstream) with a stable sort per cloud (upstream sorts batch-major codes; the same per-cloud order, with
ties inside one grid cell left in input order). `cts="paper"` is the boustrophedon traverse the paper
describes; `cts="as_written"` is upstream HEAD's `encode_cts`, which orders by the first permuted axis only.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.core.block import Block, init_weights
from mambakit.core.multi_order import MultiOrderMamba
from mambakit.core.norm import RMSNorm
from mambakit.core.orders import PointOrder

from .heads import ClsHead, ConvBNReLU1D, ConvBNReLURes1D, PointMambaPartDecoder, PosExtraction, SegHead
from .ops import farthest_point_sample, index_points, knn
from .serial import serial_knn, serial_subsample

__all__ = ["LocalGrouper", "PreExtraction", "PointMambaEncoder", "PointCloudMamba", "PointCloudMambaPartSeg",
           "create_model", "model_names", "PCM_CONFIGS", "ORDER_NAMES"]

#: orders a layer can scan in (upstream's spelling "z-trans" / "hilbert-trans" is accepted too)
ORDER_NAMES = ("xyz", "xzy", "yxz", "yzx", "zxy", "zyx", "hilbert", "hilbert_trans", "z", "z_trans")
#: how a stage picks its centres and their neighbours: upstream's FPS and exact kNN (quadratic in the points),
#: or the O(N log N) stand-ins from the Hilbert serialization (serial.py) for large clouds
SAMPLERS, NEIGHBOURS = ("fps", "serial"), ("knn", "serial")

_COMMON = dict(
    dim_expansion=(1, 1, 2, 1), pre_blocks=(1, 1, 1, 1), pos_blocks=(0, 0, 0, 0), k_neighbors=(12, 12, 12, 12),
    reducers=(1, 2, 2, 2), res_expansion=1.0, drop_path=0.1, d_state=16, d_conv=4, expand=2, grid_size=0.02,
    cts="paper", use_order_prompt=True, prompt_num_per_order=6, prompt_dim=384, mamba_pos=True,
    cls_mlps=(512, 256), dropout=0.5, decoder_blocks=(1, 1, 1, 1), gmp_dim=64, cls_dim=64,
    sampler="fps", neighbours="knn",
)
#: the published architectures (cls); task "seg" changes reducers to [2, 2, 2, 2] (cfgs/shapenetpart)
PCM_CONFIGS: dict[str, dict[str, Any]] = {
    "pcm": dict(_COMMON, embed_dim=384, mamba_blocks=(1, 2, 2, 4),
                orders=("xyz", "xzy", "yxz", "yzx", "zxy", "zyx", "hilbert", "z", "z_trans")),
    "pcm_tiny": dict(_COMMON, embed_dim=192, mamba_blocks=(1, 1, 2, 2),
                     orders=("xyz", "xzy", "yxz", "yzx", "zxy", "zyx")),
}
_SEG_OVERRIDES = dict(reducers=(2, 2, 2, 2))
_STAGE_LISTS = ("dim_expansion", "pre_blocks", "pos_blocks", "k_neighbors", "reducers", "mamba_blocks")


class LocalGrouper(nn.Module):
    """PointMLP's geometric affine grouper with use_xyz=True and "anchor" normalisation.

    forward(xyz (B, N, 3), points (B, N, C), points_res (B, N, C) or None) ->
      new_xyz (B, S, 3), grouped (B, S, k, 2C + 3), points_res at the S centres (or None); S = N // reducer.
    """

    def __init__(self, channels: int, reducer: int, k_neighbors: int, sampler: str = "fps",
                 neighbours: str = "knn"):
        super().__init__()
        if sampler not in SAMPLERS or neighbours not in NEIGHBOURS:
            raise ValueError(f"LocalGrouper: sampler must be one of {SAMPLERS} and neighbours one of {NEIGHBOURS}, "
                             f"got {sampler!r}, {neighbours!r}")
        self.reducer, self.k_neighbors = reducer, k_neighbors
        self.sampler, self.neighbours = sampler, neighbours
        self.affine_alpha = nn.Parameter(torch.ones(1, 1, 1, channels + 3))
        self.affine_beta = nn.Parameter(torch.zeros(1, 1, 1, channels + 3))

    def forward(self, xyz: torch.Tensor, points: torch.Tensor, points_res: torch.Tensor | None):
        b, n, _ = xyz.shape
        s = n // self.reducer
        if s < 1:
            raise ValueError(f"LocalGrouper: {n} points cannot be reduced by {self.reducer}")
        new_xyz, new_points = xyz, points
        if s != n:
            # sorted FPS indices keep the current serialization order of the kept points
            keep = (farthest_point_sample(xyz, s).sort(dim=-1).values if self.sampler == "fps"
                    else serial_subsample(xyz, s))                           # already ascending
            new_xyz, new_points = index_points(xyz, keep), index_points(points, keep)
            if points_res is not None:
                points_res = index_points(points_res, keep)
        if self.neighbours == "knn":
            _, idx = knn(new_xyz, xyz, self.k_neighbors)                     # (B, S, k)
        else:
            _, idx = serial_knn(new_xyz, xyz, self.k_neighbors)
        grouped = torch.cat([index_points(points, idx), index_points(xyz, idx)], dim=-1)
        anchor = torch.cat([new_points, new_xyz], dim=-1).unsqueeze(-2)     # (B, S, 1, C + 3)
        offsets = grouped - anchor
        std = offsets.reshape(b, -1).std(dim=-1).view(b, 1, 1, 1)          # one per cloud, as upstream
        grouped = self.affine_alpha * (offsets / (std + 1e-5)) + self.affine_beta
        centre = new_points.unsqueeze(-2).expand(-1, -1, self.k_neighbors, -1)
        return new_xyz, torch.cat([grouped, centre], dim=-1), points_res


class PreExtraction(nn.Module):
    """(B, S, k, 2C + 3) groups -> (B, S, C_out): ConvBNReLU1D, `blocks` residual blocks, max over k."""

    def __init__(self, channels: int, out_channels: int, blocks: int = 1, res_expansion: float = 1.0,
                 bias: bool = False):
        super().__init__()
        self.transfer = ConvBNReLU1D(2 * channels + 3, out_channels, bias=bias)
        self.operation = nn.Sequential(*[ConvBNReLURes1D(out_channels, res_expansion, bias)
                                         for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last throughout: the blocks flatten (B, S, k) into one BatchNorm batch, as upstream's
        # (B S, C, k) layout does, and the max over k reads the k axis in place
        return self.operation(self.transfer(x)).amax(dim=2)


def _normalise_order(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    if key not in ORDER_NAMES:
        raise ValueError(f"PointMambaEncoder: unknown order {name!r}; expected one of {ORDER_NAMES}")
    return key


def _serialize(order: PointOrder, pos: torch.Tensor, *tensors: torch.Tensor | None):
    """Sort pos (B, N, 3) and the (B, N, C) tensors (None passes through) by the order's codes, per cloud."""
    perm = torch.argsort(order.codes(pos.detach()), dim=1, stable=True)
    return [None if t is None else index_points(t, perm) for t in (pos, *tensors)]


class PointMambaEncoder(nn.Module):
    """PCM's encoder. forward(pos (B, N, 3), x (B, N, in_channels)) -> (B, out_channels) max-pooled features;
    `forward_levels` returns every level's positions and features (in their serialized order) for the
    segmentation decoder. See the module docstring for the computation; arguments as upstream's
    PointMambaEncoder (`orders` = mamba_layers_orders, one per Mamba layer, or one name for all;
    `drop_path` = drop_path_rate, layer i gets ([0] + linspace(0, rate, L))[i] as upstream)."""

    def __init__(self, in_channels: int = 3, embed_dim: int = 384, dim_expansion: Sequence[int] = (1, 1, 2, 1),
                 pre_blocks: Sequence[int] = (1, 1, 1, 1), pos_blocks: Sequence[int] = (0, 0, 0, 0),
                 k_neighbors: Sequence[int] = (12, 12, 12, 12), reducers: Sequence[int] = (1, 2, 2, 2),
                 mamba_blocks: Sequence[int] = (1, 2, 2, 4), orders: Sequence[str] | str = "z",
                 res_expansion: float = 1.0, drop_path: float = 0.1, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2, grid_size: float = 0.02, cts: str = "paper", use_order_prompt: bool = True,
                 prompt_num_per_order: int = 6, prompt_dim: int = 384, mamba_pos: bool = True,
                 sampler: str = "fps", neighbours: str = "knn"):
        super().__init__()
        stages = _check_stage_lists(dim_expansion=dim_expansion, pre_blocks=pre_blocks, pos_blocks=pos_blocks,
                                    k_neighbors=k_neighbors, reducers=reducers, mamba_blocks=mamba_blocks)
        n_layers = sum(mamba_blocks)
        orders = [orders] * n_layers if isinstance(orders, str) else list(orders)
        if len(orders) != n_layers:
            raise ValueError(f"PointMambaEncoder: {len(orders)} orders for {n_layers} Mamba layers "
                             f"(mamba_blocks={list(mamba_blocks)}); give one order per layer or a single name")
        if cts not in ("paper", "as_written"):
            raise ValueError(f"PointMambaEncoder: cts must be 'paper' or 'as_written', got {cts!r}")
        if in_channels < 1 or embed_dim < 1:
            raise ValueError(f"PointMambaEncoder: in_channels and embed_dim must be positive, got "
                             f"{in_channels}, {embed_dim}")
        self.in_channels = in_channels
        self.layer_orders = [_normalise_order(o) for o in orders]
        unique = list(dict.fromkeys(self.layer_orders))    # first appearance (upstream: set(), see convert.py)
        self.unique_orders = unique
        self.serializers = {o: PointOrder(o, grid_size=grid_size, snake=cts) for o in unique}
        self.use_order_prompt, self.prompt_num_per_order, self.mamba_pos = use_order_prompt, prompt_num_per_order, mamba_pos

        self.embedding = ConvBNReLU1D(in_channels, embed_dim, bias=False)
        widths = [embed_dim]
        for ratio in dim_expansion:
            widths.append(widths[-1] * ratio)
        self.channels = widths                               # embedding, then each stage's output
        self.out_channels = widths[-1]

        if use_order_prompt:
            self.order_prompt = nn.Embedding(len(unique) * prompt_num_per_order, prompt_dim)
            self.order_prompt_proj = nn.ModuleList()
        if mamba_pos:
            # upstream shares one projection when every stage has the same width
            self.pos_proj_shared = all(r == 1 for r in dim_expansion)
            self.pos_proj = (nn.Linear(3, embed_dim, bias=False) if self.pos_proj_shared
                             else nn.ModuleList(nn.Linear(3, c, bias=False) for c in widths[1:]))

        self.local_grouper_list = nn.ModuleList()
        self.pre_blocks_list = nn.ModuleList()
        self.mamba_blocks_list = nn.ModuleList()
        self.pos_blocks_list = nn.ModuleList()
        self.residual_proj_blocks_list = nn.ModuleList()
        rates = [0.0] + torch.linspace(0, drop_path, n_layers, device="cpu").tolist()   # upstream: float32 steps
        layer = 0
        for i in range(stages):
            c_in, c_out = widths[i], widths[i + 1]
            self.local_grouper_list.append(LocalGrouper(c_in, reducers[i], k_neighbors[i], sampler, neighbours))
            self.pre_blocks_list.append(PreExtraction(c_in, c_out, pre_blocks[i], res_expansion, bias=False))
            self.residual_proj_blocks_list.append(nn.Identity() if c_in == c_out or i == 0
                                                  else nn.Linear(c_in, c_out, bias=False))
            if use_order_prompt:
                self.order_prompt_proj.append(nn.Linear(prompt_dim, c_out, bias=False))
            blocks = nn.Sequential()
            for _ in range(mamba_blocks[i]):
                mixer = partial(MultiOrderMamba.bimamba, d_state=d_state, d_conv=d_conv, expand=expand,
                                layer_idx=layer)
                blocks.append(Block(c_out, mixer, norm_cls=partial(RMSNorm, eps=1e-5), fused_add_norm=True,
                                    residual_in_fp32=True, drop_path=rates[layer]))
                layer += 1
            self.mamba_blocks_list.append(blocks)
            self.pos_blocks_list.append(PosExtraction(c_out, pos_blocks[i], res_expansion, bias=False)
                                        if pos_blocks[i] > 0 else nn.Identity())
        self._init_like_upstream(n_layers)

    def _init_like_upstream(self, n_layers: int) -> None:
        """mamba_ssm's _init_weights over the Mamba layers (zero Linear biases except dt_proj's, out_proj
        rescaled by 1/sqrt(n_layers)). PCM's vendored Mamba gives the backward branch's dt_proj_b PyTorch's
        default Linear init, whose bias _init_weights then zeroes; we do the same so training starts where
        upstream's does."""
        for blocks in self.mamba_blocks_list:
            for block in blocks:
                block.mixer.dt_proj_b.reset_parameters()
                block.mixer.dt_proj_b.bias._no_reinit = False
        self.mamba_blocks_list.apply(partial(init_weights, n_layer=max(n_layers, 1)))

    # -- forward -------------------------------------------------------------------------------------------
    def _check_inputs(self, pos: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[-1] != 3:
            got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise ValueError(f"PointMambaEncoder: pos must have shape (batch, points, 3), got {got}")
        if not pos.dtype.is_floating_point:
            raise TypeError(f"PointMambaEncoder: pos must hold float positions, got {pos.dtype}")
        if x is None:
            if self.in_channels != 3:
                raise ValueError(f"PointMambaEncoder: x is None but the model expects {self.in_channels} input "
                                 f"channels (only 3-channel models take xyz from pos)")
            return pos
        if x.dim() != 3 or x.shape[:2] != pos.shape[:2] or x.shape[2] != self.in_channels:
            raise ValueError(f"PointMambaEncoder: x has shape {tuple(x.shape)}, expected "
                             f"({pos.shape[0]}, {pos.shape[1]}, {self.in_channels}) (batch, points, in_channels)")
        return x

    def _prompt(self, stage: int, layer: int, batch: int) -> torch.Tensor:
        start = self.unique_orders.index(self.layer_orders[layer]) * self.prompt_num_per_order
        tokens = self.order_prompt.weight[start:start + self.prompt_num_per_order]
        return self.order_prompt_proj[stage](tokens).unsqueeze(0).expand(batch, -1, -1)

    def _pos_encoding(self, stage: int, pos: torch.Tensor) -> torch.Tensor:
        return self.pos_proj(pos) if self.pos_proj_shared else self.pos_proj[stage](pos)

    def _mamba_stage(self, stage: int, first_layer: int, pos, x, x_res, current: str):
        """The stage's Mamba layers on (B, S, C) features; returns pos, x, x_res in the last layer's order."""
        layer = first_layer
        for block in self.mamba_blocks_list[stage]:
            order = self.layer_orders[layer]
            if order != current:
                pos, x, x_res = _serialize(self.serializers[order], pos, x, x_res)
                current = order
            if self.mamba_pos:
                x = x + self._pos_encoding(stage, pos).to(x.dtype)
            if self.use_order_prompt:
                prompt = self._prompt(stage, layer, x.shape[0]).to(x.dtype)
                n = self.prompt_num_per_order
                x = torch.cat([prompt, x, prompt], dim=1)
                if x_res is not None:
                    x_res = torch.cat([prompt.to(x_res.dtype), x_res, prompt.to(x_res.dtype)], dim=1)
                x, x_res = block(x, x_res)
                x, x_res = x[:, n:-n], x_res[:, n:-n]
            else:
                x, x_res = block(x, x_res)
            layer += 1
        return pos, x, x_res, current

    def forward_levels(self, pos: torch.Tensor, x: torch.Tensor | None = None
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Positions (B, N_i, 3) and features (B, N_i, C_i) of the input level (embedding) and of each stage,
        each stage in the serialized order its last layer left."""
        x = self._check_inputs(pos, x)
        x = self.embedding(x)                                               # (B, N, embed_dim)
        pos_list, feat_list = [pos], [x]
        x_res, current, layer = None, "original", 0
        for i in range(len(self.local_grouper_list)):
            pos, grouped, x_res = self.local_grouper_list[i](pos, x, x_res)
            x = self.pre_blocks_list[i](grouped)
            if x_res is not None:
                x_res = self.residual_proj_blocks_list[i](x_res)
            pos, x, x_res, current = self._mamba_stage(i, layer, pos, x, x_res, current)
            layer += len(self.mamba_blocks_list[i])
            if not isinstance(self.pos_blocks_list[i], nn.Identity):
                x = self.pos_blocks_list[i](x)
            pos_list.append(pos)
            feat_list.append(x)
        return pos_list, feat_list

    def forward(self, pos: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        _, feats = self.forward_levels(pos, x)
        return feats[-1].amax(dim=1)


class PointCloudMamba(nn.Module):
    """PCM classifier: forward(pos (B, N, 3), x (B, N, in_channels)) -> logits (B, n_classes)."""

    def __init__(self, n_classes: int, in_channels: int = 3, cls_mlps: Sequence[int] = (512, 256),
                 dropout: float = 0.5, **encoder_kwargs):
        super().__init__()
        self.encoder = PointMambaEncoder(in_channels=in_channels, **encoder_kwargs)
        self.prediction = ClsHead(self.encoder.out_channels, n_classes, cls_mlps, dropout)

    def forward(self, pos: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.prediction(self.encoder(pos, x))


class PointCloudMambaPartSeg(nn.Module):
    """PCM part segmentation (upstream's BasePartSeg: PointMambaEncoder + PointMambaPartDecoder + SegHead):
    forward(pos (B, N, 3), x (B, N, in_channels), category (B,) int64) -> logits (B, N, n_parts)."""

    def __init__(self, n_parts: int, n_categories: int, in_channels: int = 3,
                 decoder_blocks: Sequence[int] = (1, 1, 1, 1), gmp_dim: int = 64, cls_dim: int = 64,
                 dropout: float = 0.5, **encoder_kwargs):
        super().__init__()
        self.encoder = PointMambaEncoder(in_channels=in_channels, **encoder_kwargs)
        self.decoder = PointMambaPartDecoder(self.encoder.channels, n_categories, decoder_blocks, gmp_dim, cls_dim)
        self.head = SegHead(self.decoder.out_channels, n_parts, dropout)
        self.n_categories = n_categories

    def forward(self, pos: torch.Tensor, x: torch.Tensor | None, category: torch.Tensor) -> torch.Tensor:
        category = _check_category(category, pos.shape[0], self.n_categories)
        pos_list, feat_list = self.encoder.forward_levels(pos, x)
        return self.head.forward_last(self.decoder.forward_last(pos_list, feat_list, category))


def _check_category(category: torch.Tensor, batch: int, n_categories: int) -> torch.Tensor:
    if not isinstance(category, torch.Tensor) or category.dtype.is_floating_point or category.dtype == torch.bool:
        raise TypeError(f"category must be an int64 tensor of shape ({batch},), got "
                        f"{getattr(category, 'dtype', type(category).__name__)}")
    category = category.reshape(-1).long()
    if category.numel() != batch:
        raise ValueError(f"category has {category.numel()} entries for a batch of {batch}; expected shape ({batch},)")
    if category.numel() and (int(category.min()) < 0 or int(category.max()) >= n_categories):
        raise ValueError(f"category values must lie in [0, {n_categories}) (n_categories), got "
                         f"[{int(category.min())}, {int(category.max())}]")
    return category


def _check_stage_lists(**lists: Sequence[int]) -> int:
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"PointMambaEncoder: the per-stage lists must have one entry per stage, got lengths "
                         f"{lengths}")
    for name, values in lists.items():
        low = 0 if name in ("pos_blocks", "mamba_blocks") else 1
        bad = [v for v in values if not isinstance(v, int) or v < low]
        if bad:
            extra = (" (upstream's pre_blocks=0 path, max pooling only, changes the stage width and is not "
                     "supported)") if name == "pre_blocks" else ""
            raise ValueError(f"PointMambaEncoder: {name} entries must be ints >= {low}, got {list(values)}{extra}")
    return next(iter(lengths.values()))


# -- factory -------------------------------------------------------------------------------------------------
def _baselines() -> dict[str, Callable[..., nn.Module]]:
    try:
        from .baselines import BASELINES
    except ImportError:
        return {}
    return dict(BASELINES)


def model_names() -> list[str]:
    """Names `create_model` accepts: PCM's, then the baselines' (when baselines.py is present)."""
    return list(PCM_CONFIGS) + sorted(_baselines())


def pcm_config(name: str, task: str = "cls", **overrides) -> dict[str, Any]:
    """The architecture constants of `name` ("pcm" / "pcm_tiny") for `task`, with overrides applied."""
    key = name.lower().replace("-", "_")
    if key not in PCM_CONFIGS:
        raise ValueError(f"unknown PCM model {name!r}; expected one of {list(PCM_CONFIGS)}")
    cfg = dict(PCM_CONFIGS[key], **(_SEG_OVERRIDES if task == "seg" else {}))
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {unknown}; accepted: {sorted(cfg)}")
    cfg.update(overrides)
    return cfg


def create_model(name: str, n_classes: int, in_channels: int = 3, task: str = "cls", n_categories: int = 0,
                 **kwargs) -> nn.Module:
    """A point-cloud model by name (see `model_names()`). task "cls": model(pos, x) -> (B, n_classes);
    task "seg": model(pos, x, category) -> (B, N, n_classes) with n_classes part labels and n_categories
    shape categories. kwargs override architecture constants (for PCM: see `PCM_CONFIGS`)."""
    if task not in ("cls", "seg"):
        raise ValueError(f"create_model: task must be 'cls' or 'seg', got {task!r}")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"create_model: n_classes must be a positive int, got {n_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"create_model: in_channels must be a positive int, got {in_channels!r}")
    if task == "seg" and (not isinstance(n_categories, int) or n_categories < 1):
        raise ValueError(f"create_model: task 'seg' needs n_categories >= 1 (shape categories for the one-hot), "
                         f"got {n_categories!r}")
    key = name.lower().replace("-", "_")
    if key in PCM_CONFIGS:
        cfg = pcm_config(key, task, **kwargs)
        cls_mlps, dropout = cfg.pop("cls_mlps"), cfg.pop("dropout")
        decoder = {k: cfg.pop(k) for k in ("decoder_blocks", "gmp_dim", "cls_dim")}
        if task == "cls":
            return PointCloudMamba(n_classes, in_channels, cls_mlps, dropout, **cfg)
        return PointCloudMambaPartSeg(n_classes, n_categories, in_channels, dropout=dropout, **decoder, **cfg)
    baselines = _baselines()
    if key in baselines:
        return baselines[key](n_classes, in_channels=in_channels, task=task, n_categories=n_categories, **kwargs)
    raise ValueError(f"create_model: unknown model {name!r}; expected one of {model_names()}")
