"""The point-cloud baselines Point Cloud Mamba is compared with: PointNet++ SSG (Qi et al. 2017), Point
Transformer (Zhao et al. 2021, as PyG's example) and DGCNN (Wang et al. 2019), under the app's calling convention:

- classification: ``model(pos, x) -> logits (B, n_classes)``
- part segmentation: ``model(pos, x, category) -> logits (B, N, n_parts)``, category (B,) int64, one-hot inside

with pos (B, N, 3) and x (B, N, in_channels). Neighbourhoods come from `ops` (batched, chunked, nothing compiled),
so every model runs on CPU and GPU alike, and point counts follow the input: a stage asked for more centres than
the cloud has takes the whole cloud.

Every builder is ``(n_classes, in_channels=3, task="cls", n_categories=0, **kwargs) -> nn.Module``; the kwargs
are the model's constructor arguments (widths, point counts, radii, k, dropout), so tests and quick recipes
shrink a model without a second code path. Defaults are the published sizes.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .ops import ball_query, farthest_point_sample, feature_knn, index_points, knn, three_nn_interpolate

__all__ = ["BASELINES", "SharedMLP", "PointNet2SSG", "PointTransformer", "DGCNN", "pointnet2_ssg",
           "point_transformer", "dgcnn"]

TASKS = ("cls", "seg")


# ---------------------------------------------------------------- shared pieces

class SharedMLP(nn.Module):
    """Linear -> BatchNorm -> activation per layer, applied to the last axis of a tensor of any rank: the
    1x1 convolutions of the reference code, written channel-last so that grouped (B, S, K, C) tensors need no
    transposes (BatchNorm runs over every leading position, as BatchNorm2d over (B, C, S, K) does)."""

    def __init__(self, channels: Sequence[int], *, norm: bool = True, bias: bool = True,
                 act: Callable[[], nn.Module] = nn.ReLU, last_act: bool = True):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"SharedMLP needs input and output widths, got {list(channels)}")
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(channels[:-1], channels[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(c) if norm else nn.Identity() for c in channels[1:])
        n = len(self.linears)
        self.acts = nn.ModuleList(act() if last_act or i < n - 1 else nn.Identity() for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear, norm, act in zip(self.linears, self.norms, self.acts):
            x = linear(x)
            if isinstance(norm, nn.BatchNorm1d):
                x = norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)
            x = act(x)
        return x


def _check_task(model: str, task: str, n_categories: int) -> None:
    if task not in TASKS:
        raise ValueError(f"{model}: task must be one of {TASKS}, got {task!r}")
    if n_categories < 0:
        raise ValueError(f"{model}: n_categories must be >= 0, got {n_categories}")


def _check_inputs(model: str, pos: torch.Tensor, x: torch.Tensor, in_channels: int) -> None:
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[-1] != 3 or pos.shape[1] < 1:
        got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"{model}: pos must have shape (batch, points, 3), got {got}")
    b, n, _ = pos.shape
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (b, n, in_channels):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{model}: x must have shape (batch={b}, points={n}, in_channels={in_channels}), "
                         f"got {got}")


def _category_one_hot(model: str, category: torch.Tensor | None, n_categories: int, batch: int
                      ) -> torch.Tensor | None:
    """(B,) int64 shape categories -> (B, n_categories) one-hot; None where the model has no categories."""
    if n_categories == 0:
        return None
    if not isinstance(category, torch.Tensor) or category.shape != (batch,) or category.dtype != torch.int64:
        got = f"{category.dtype} {tuple(category.shape)}" if isinstance(category, torch.Tensor) else category
        raise ValueError(f"{model}: category must be int64 of shape (batch={batch},), got {got}")
    if category.numel() and (category.min() < 0 or category.max() >= n_categories):
        raise ValueError(f"{model}: category values must lie in [0, {n_categories}), got "
                         f"{category.min().item()}..{category.max().item()}")
    return F.one_hot(category, n_categories).float()


def _per_point(one_hot: torch.Tensor | None, n: int, like: torch.Tensor) -> list[torch.Tensor]:
    return [] if one_hot is None else [one_hot.to(like.dtype)[:, None, :].expand(-1, n, -1)]


def _classifier(widths: Sequence[int], n_classes: int, dropout: float | Sequence[float], *,
                act: Callable[[], nn.Module] = nn.ReLU, first_bias: bool = True) -> nn.Sequential:
    """The reference classification heads: (Linear -> BatchNorm -> act -> Dropout) per hidden width, then a
    Linear to the classes."""
    drops = [dropout] * (len(widths) - 1) if isinstance(dropout, (int, float)) else list(dropout)
    if len(drops) != len(widths) - 1:
        raise ValueError(f"dropout: one rate per hidden layer ({len(widths) - 1}), got {drops}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b, bias=first_bias or i > 0), nn.BatchNorm1d(b), act(), nn.Dropout(drops[i])]
    return nn.Sequential(*layers, nn.Linear(widths[-1], n_classes))


# ---------------------------------------------------------------- PointNet++ (single-scale grouping)

class SetAbstraction(nn.Module):
    """FPS centres, ball-query neighbourhoods, a shared MLP on (relative position, features), max over each
    neighbourhood. ``n_centres=None`` groups the whole cloud into one (absolute positions, as the reference)."""

    def __init__(self, n_centres: int | None, radius: float, n_neighbours: int, in_channels: int,
                 widths: Sequence[int]):
        super().__init__()
        self.n_centres, self.radius, self.n_neighbours = n_centres, radius, n_neighbours
        self.mlp = SharedMLP([in_channels + 3, *widths])

    def forward(self, pos: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_centres is None:
            grouped = torch.cat([pos, feats], -1)[:, None]                        # (B, 1, N, 3 + C)
            centres = pos.new_zeros(pos.shape[0], 1, 3)
        else:
            centres = index_points(pos, farthest_point_sample(pos, min(self.n_centres, pos.shape[1])))
            neighbours = ball_query(centres, pos, self.radius, self.n_neighbours)   # (B, S, K)
            offsets = index_points(pos, neighbours) - centres[:, :, None]
            grouped = torch.cat([offsets, index_points(feats, neighbours)], -1)   # (B, S, K, 3 + C)
        return centres, self.mlp(grouped).amax(2)


class FeaturePropagation(nn.Module):
    """Coarse features carried to finer points by three-NN inverse-distance interpolation, concatenated with
    the finer level's own features (skip link) and mixed by a shared MLP."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        self.mlp = SharedMLP([in_channels, *widths])

    def forward(self, pos, coarse_pos, feats, coarse_feats):
        return self.mlp(torch.cat([feats, three_nn_interpolate(pos, coarse_pos, coarse_feats)], -1))


class PointNet2SSG(nn.Module):
    """PointNet++ SSG: two set abstractions (512 centres r 0.2 32 neighbours; 128 centres r 0.4 64 neighbours)
    and one over the whole cloud; classification by FC 512-256 with BatchNorm and dropout (0.4, 0.4 as the
    PyTorch reference of Xu Yan), segmentation by three feature propagations ([256, 256], [256, 128],
    [128, 128, 128]; the last one sees the category one-hot, xyz and the input features) and a 128 conv +
    dropout 0.5 head. The first abstraction sees (relative xyz, x), so in_channels counts x's channels."""

    def __init__(self, n_classes: int, in_channels: int = 3, task: str = "cls", n_categories: int = 0, *,
                 npoints: Sequence[int] = (512, 128), radii: Sequence[float] = (0.2, 0.4),
                 nsamples: Sequence[int] = (32, 64),
                 sa_widths: Sequence[Sequence[int]] = ((64, 64, 128), (128, 128, 256), (256, 512, 1024)),
                 fp_widths: Sequence[Sequence[int]] = ((256, 256), (256, 128), (128, 128, 128)),
                 head_widths: Sequence[int] = (512, 256), dropout: float | Sequence[float] | None = None):
        super().__init__()
        _check_task("pointnet2_ssg", task, n_categories)
        if not len(npoints) == len(radii) == len(nsamples) == len(sa_widths) - 1:
            raise ValueError(f"pointnet2_ssg: npoints, radii, nsamples need one entry per local set abstraction "
                             f"({len(sa_widths) - 1} from sa_widths), got {list(npoints)}, {list(radii)}, "
                             f"{list(nsamples)}")
        if task == "seg" and len(fp_widths) != len(sa_widths):
            raise ValueError(f"pointnet2_ssg: fp_widths needs one entry per set abstraction ({len(sa_widths)}), "
                             f"got {len(fp_widths)}")
        self.task, self.in_channels, self.n_categories = task, in_channels, n_categories
        widths_in = [in_channels] + [w[-1] for w in sa_widths[:-1]]
        self.sa = nn.ModuleList(
            SetAbstraction(npoints[i] if i < len(npoints) else None, radii[i] if i < len(radii) else 0.0,
                           nsamples[i] if i < len(nsamples) else 0, widths_in[i], sa_widths[i])
            for i in range(len(sa_widths)))
        if task == "cls":
            self.head = _classifier([sa_widths[-1][-1], *head_widths], n_classes,
                                    0.4 if dropout is None else dropout)
            return
        # feature propagation from the coarsest level up: level i+1's features onto level i's points
        skip = [n_categories + 3 + in_channels] + [w[-1] for w in sa_widths[:-1]]
        coarse = sa_widths[-1][-1]
        fps_ = []
        for level in reversed(range(len(sa_widths))):
            widths = fp_widths[len(sa_widths) - 1 - level]
            fps_.append(FeaturePropagation(skip[level] + coarse, widths))
            coarse = widths[-1]
        self.fp = nn.ModuleList(fps_)
        self.head = nn.Sequential(SharedMLP([coarse, 128]), nn.Dropout(0.5 if dropout is None else dropout),
                                  nn.Linear(128, n_classes))

    def forward(self, pos: torch.Tensor, x: torch.Tensor, category: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs("pointnet2_ssg", pos, x, self.in_channels)
        levels = [(pos, x)]
        for sa in self.sa:
            levels.append(sa(*levels[-1]))
        if self.task == "cls":
            return self.head(levels[-1][1].squeeze(1))
        one_hot = _category_one_hot("pointnet2_ssg", category, self.n_categories, pos.shape[0])
        levels[0] = (pos, torch.cat(_per_point(one_hot, pos.shape[1], x) + [pos, x], -1))
        coarse_pos, feats = levels[-1]
        for fp, (fine_pos, fine_feats) in zip(self.fp, reversed(levels[:-1])):
            feats = fp(fine_pos, coarse_pos, fine_feats, feats)
            coarse_pos = fine_pos
        return self.head(feats)


# ---------------------------------------------------------------- Point Transformer (PyG example)

def _knn_edges(pos: torch.Tensor, k: int) -> torch.Tensor:
    """PyG's ``knn_graph(pos, k, batch)`` for a batch of equal-size clouds: edges (2, B*N*k') source ->
    target over the flattened points, each point's k nearest others (k' = min(k, N - 1)). The kNN asks for one
    more to cover the point itself; PointTransformerConv drops self loops and adds one per point again."""
    b, n, _ = pos.shape
    kk = min(k + 1, n)
    idx = knn(pos, pos, kk)[1] + (torch.arange(b, device=pos.device) * n)[:, None, None]
    target = torch.arange(b * n, device=pos.device).view(b, n, 1).expand(b, n, kk)
    return torch.stack([idx.reshape(-1), target.reshape(-1)])


class PointTransformerBlock(nn.Module):
    """lin_in -> PointTransformerConv (vector attention, pos_nn and attn_nn as two-layer MLPs of width 64)
    -> lin_out, ReLU after each linear, as PyG's example TransformerBlock."""

    def __init__(self, channels: int):
        super().__init__()
        from torch_geometric.nn import PointTransformerConv

        self.lin_in = nn.Linear(channels, channels)
        self.lin_out = nn.Linear(channels, channels)
        pos_nn = SharedMLP([3, 64, channels], norm=False)
        attn_nn = SharedMLP([channels, 64, channels], norm=False)
        self.transformer = PointTransformerConv(channels, channels, pos_nn=pos_nn, attn_nn=attn_nn)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """x (B, N, C), pos (B, N, 3), edges from `_knn_edges(pos)`."""
        b, n, c = x.shape
        out = self.transformer(self.lin_in(x).relu().reshape(b * n, c), pos.reshape(b * n, 3), edges)
        return self.lin_out(out.view(b, n, c)).relu()


class TransitionDown(nn.Module):
    """FPS to ceil(ratio * N) centres, a Linear-BN-ReLU on every point, max over each centre's k nearest."""

    def __init__(self, in_channels: int, out_channels: int, ratio: float = 0.25, k: int = 16):
        super().__init__()
        self.ratio, self.k = ratio, k
        self.mlp = SharedMLP([in_channels, out_channels])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = pos.shape[1]
        centres = index_points(pos, farthest_point_sample(pos, max(1, math.ceil(self.ratio * n))))
        neighbours = knn(centres, pos, min(self.k, n))[1]
        return index_points(self.mlp(x), neighbours).amax(2), centres


class TransitionUp(nn.Module):
    """Coarse features through Linear-BN-ReLU, three-NN interpolated onto the finer points, added to the finer
    points' own features through another Linear-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.mlp_sub = SharedMLP([in_channels, out_channels])
        self.mlp = SharedMLP([out_channels, out_channels])

    def forward(self, x, x_sub, pos, pos_sub):
        return self.mlp(x) + three_nn_interpolate(pos, pos_sub, self.mlp_sub(x_sub))


class PointTransformer(nn.Module):
    """Point Transformer as PyG's ``examples/point_transformer_{classification,segmentation}.py``: a
    Linear-BN-ReLU stem to dims[0], a transformer block, then per stage TransitionDown (FPS ratio 0.25, kNN
    max pool) and a block; classification by mean pool and Linear 64 - ReLU - Linear; segmentation adds a
    summit (Linear-ReLU + block) and per stage TransitionUp + block back to dims[0], then Linear 64 - ReLU -
    Linear per point. kNN graphs have k = 16 neighbours. For segmentation the category one-hot joins x at
    the stem (PyG's example trains one category at a time and has none)."""

    def __init__(self, n_classes: int, in_channels: int = 3, task: str = "cls", n_categories: int = 0, *,
                 dims: Sequence[int] = (32, 64, 128, 256, 512), k: int = 16, ratio: float = 0.25):
        super().__init__()
        _check_task("point_transformer", task, n_categories)
        self.task, self.in_channels, self.n_categories, self.k = task, in_channels, n_categories, k
        stem_in = in_channels + (n_categories if task == "seg" else 0)
        self.mlp_input = SharedMLP([stem_in, dims[0]])
        self.transformer_input = PointTransformerBlock(dims[0])
        self.transition_down = nn.ModuleList(TransitionDown(a, b, ratio, k) for a, b in zip(dims[:-1], dims[1:]))
        self.transformers_down = nn.ModuleList(PointTransformerBlock(c) for c in dims[1:])
        if task == "cls":
            self.mlp_output = SharedMLP([dims[-1], 64, n_classes], norm=False, last_act=False)
            return
        self.mlp_summit = SharedMLP([dims[-1], dims[-1]], norm=False)
        self.transformer_summit = PointTransformerBlock(dims[-1])
        self.transition_up = nn.ModuleList(TransitionUp(b, a) for a, b in zip(dims[:-1], dims[1:]))
        self.transformers_up = nn.ModuleList(PointTransformerBlock(c) for c in dims[:-1])
        self.mlp_output = SharedMLP([dims[0], 64, n_classes], norm=False, last_act=False)

    def forward(self, pos: torch.Tensor, x: torch.Tensor, category: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs("point_transformer", pos, x, self.in_channels)
        if self.task == "seg":
            one_hot = _category_one_hot("point_transformer", category, self.n_categories, pos.shape[0])
            x = torch.cat([x] + _per_point(one_hot, pos.shape[1], x), -1)
        x = self.transformer_input(self.mlp_input(x), pos, _knn_edges(pos, self.k))
        levels = [(x, pos)]
        for down, block in zip(self.transition_down, self.transformers_down):
            x, pos = down(x, pos)
            x = block(x, pos, _knn_edges(pos, self.k))
            levels.append((x, pos))
        if self.task == "cls":
            return self.mlp_output(x.mean(1))
        x = self.transformer_summit(self.mlp_summit(x), pos, _knn_edges(pos, self.k))
        for i in reversed(range(len(self.transition_up))):
            fine_x, fine_pos = levels[i]
            x = self.transition_up[i](fine_x, x, fine_pos, levels[i + 1][1])
            x = self.transformers_up[i](x, fine_pos, _knn_edges(fine_pos, self.k))
        return self.mlp_output(x)


# ---------------------------------------------------------------- DGCNN

def _leaky_relu() -> nn.Module:
    return nn.LeakyReLU(0.2)


class EdgeConv(nn.Module):
    """For every point and each of its k neighbours the edge feature (x_j - x_i, x_i), a bias-free
    Linear-BN-LeakyReLU(0.2), max over the neighbours."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.mlp = SharedMLP([2 * in_channels, out_channels], bias=False, act=_leaky_relu)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        centre = x[:, :, None, :].expand(-1, -1, neighbours.shape[-1], -1)
        return self.mlp(torch.cat([index_points(x, neighbours) - centre, centre], -1)).amax(2)


class DGCNN(nn.Module):
    """DGCNN classification (Wang et al. 2019, the authors' PyTorch code): EdgeConv 64, 64, 128, 256 on k = 20
    neighbour graphs rebuilt in feature space at each layer (the first on xyz), their outputs concatenated
    into a 1024-wide bias-free Linear-BN-LeakyReLU, max and mean pooled, then MLP 512 - 256 with BatchNorm,
    LeakyReLU and dropout 0.5. The first graph is built on pos, which for in_channels = 3 (x = xyz) is the
    reference's graph on its input."""

    def __init__(self, n_classes: int, in_channels: int = 3, task: str = "cls", n_categories: int = 0, *,
                 k: int = 20, edge_widths: Sequence[int] = (64, 64, 128, 256), emb_dims: int = 1024,
                 head_widths: Sequence[int] = (512, 256), dropout: float | Sequence[float] = 0.5):
        super().__init__()
        _check_task("dgcnn", task, n_categories)
        if task == "seg":
            raise NotImplementedError("dgcnn: part segmentation is not implemented; use task='cls', or "
                                      "pointnet2_ssg / point_transformer for segmentation")
        self.in_channels, self.k = in_channels, k
        widths_in = [in_channels, *edge_widths[:-1]]
        self.edge_convs = nn.ModuleList(EdgeConv(a, b) for a, b in zip(widths_in, edge_widths))
        self.embed = SharedMLP([sum(edge_widths), emb_dims], bias=False, act=_leaky_relu)
        self.head = _classifier([2 * emb_dims, *head_widths], n_classes, dropout, act=_leaky_relu,
                                first_bias=False)

    def forward(self, pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_inputs("dgcnn", pos, x, self.in_channels)
        outs = []
        neighbours = knn(pos, pos, self.k)[1]
        for i, conv in enumerate(self.edge_convs):
            if i > 0:
                neighbours = feature_knn(x, self.k)
            x = conv(x, neighbours)
            outs.append(x)
        x = self.embed(torch.cat(outs, -1))
        return self.head(torch.cat([x.amax(1), x.mean(1)], -1))


# ---------------------------------------------------------------- registry

def pointnet2_ssg(n_classes: int, in_channels: int = 3, task: str = "cls", n_categories: int = 0,
                  **kwargs) -> PointNet2SSG:
    return PointNet2SSG(n_classes, in_channels, task, n_categories, **kwargs)


def point_transformer(n_classes: int, in_channels: int = 3, task: str = "cls", n_categories: int = 0,
                      **kwargs) -> PointTransformer:
    return PointTransformer(n_classes, in_channels, task, n_categories, **kwargs)


def dgcnn(n_classes: int, in_channels: int = 3, task: str = "cls", n_categories: int = 0, **kwargs) -> DGCNN:
    return DGCNN(n_classes, in_channels, task, n_categories, **kwargs)


#: name -> builder ``(n_classes, in_channels=3, task="cls", n_categories=0, **kwargs) -> nn.Module``
BASELINES: dict[str, Callable[..., nn.Module]] = {
    "pointnet2_ssg": pointnet2_ssg,
    "point_transformer": point_transformer,
    "dgcnn": dgcnn,
}
