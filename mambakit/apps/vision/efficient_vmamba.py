"""EfficientVMamba (TerryPei/EfficientVMamba, `classification/models/vmamba_efficient.py`) as a timm family.

    import mambakit.apps.vision, timm
    model = timm.create_model("efficient_vmamba_tiny", pretrained=True, num_classes=10)

Network (`EfficientVSSM` with the published configs: MLP_RATIO 0, DOWNSAMPLE "v1"), channels-last (B, H, W, C):

    patch_embed   Conv2d(k=4, s=4) -> LayerNorm                           dims [d, 2d, 4d, 8d]
    stages 0, 1   EVSS blocks, then PatchMerging2D (2x2 concat -> LayerNorm -> Linear 4C -> 2C)
    stages 2, 3   MobileNetV2 inverted residuals (1x1 x4 expand, dw 3x3, SE 0.125, 1x1; BN, ReLU), then
                  PatchMerging2D (none after the last stage)
    classifier    LayerNorm -> global average pool -> Linear

EVSS block: x = LN(input); out = input + drop_path(gate(SS2D(x)) + gate(conv_branch(x))), where the same
channel gate `BiAttn` (LN, spatial mean, Linear C -> C/8, GELU, Linear, sigmoid) scales both branches and the
conv branch is dw 3x3 -> BN -> GELU -> 1x1. No MLP.

SS2D with the ES2D atrous scan: in_proj (C -> 2 d_inner: x | z), z = SiLU(z), x = SiLU(dw Conv2d 3x3(x)); the
(H, W) grid, zero-padded to even sides, is split into the four cells of the 2x2 lattice (core's
`atrous_0..3` orders: even/even row-major, odd/even column-major, even/odd row-major, odd/odd column-major),
each cell is scanned by its own SSM (K=4 parameter sets: `x_proj_weight (K, R + 2N, d_inner)`,
`dt_projs_weight (K, d_inner, R)`, `dt_projs_bias (K, d_inner)`, `A_logs (K d_inner, N)`, `Ds (K d_inner)`),
the outputs go back to their pixels, then `out_norm` (LayerNorm), * z, out_proj. Each pixel is scanned once.

Why SS2D lives here rather than in core's multi-order mixer: its parameters are stacked per order
(VMamba's layout, which the published checkpoints use), its local mixing is a 2D depthwise conv before the
orders are taken (core's mixers run a causal 1D conv per order), and it normalises with a LayerNorm before
the gate. It is built from core's `selective_scan` with grouped B/C (one group per order: the K scans run as
one (B, K d_inner, L) scan) and core's atrous lattice orders.

Parameter names follow upstream module by module (including the parameter-free Permute modules that fix
the indices of `layers.2.*`), so `efficient_vmamba_*.ckpt` loads with strict=True once the `module.module.`
prefix is stripped. Parameter counts match the training logs: T 6.494M, S 11.274M, B 33.717M. Note that the
published "small" is 64 wide (as its log and head show), not the 96 of its yaml.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from mambakit.core import DropPath, selective_scan
from mambakit.core.scan import runs_fused_cpu_kernel
from mambakit.core.mamba import init_dt_proj
from mambakit.core.orders import ATROUS_2X2, scan_order

__all__ = ["EfficientVSSM", "SS2D", "VSSBlock", "BiAttn", "InvertedResidual", "PatchMerging2D", "EFFICIENT_VMAMBA_MODELS"]

EFFICIENT_VMAMBA_MODELS = ("efficient_vmamba_tiny", "efficient_vmamba_small", "efficient_vmamba_base")


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class SS2D(nn.Module):
    """The ES2D state-space mixer. x (B, H, W, d_model) -> (B, H, W, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank="auto", d_conv: int = 3,
                 conv_bias: bool = True, bias: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4, dropout: float = 0.0,
                 orders=ATROUS_2X2, scan_backend: str = "auto"):
        super().__init__()
        self.d_model = d_model
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.orders = tuple(scan_order(o) for o in orders)
        self.K = K = len(self.orders)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                bias=conv_bias)
        # Per-order parameters, stacked as in VMamba: initialised like K separate x_proj / dt_proj Linears.
        x_projs = [nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False) for _ in range(K)]
        self.x_proj_weight = nn.Parameter(torch.stack([p.weight for p in x_projs]))          # (K, R + 2N, d_inner)
        dt_projs = []
        for _ in range(K):
            dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
            init_dt_proj(dt_proj, self.dt_rank, d_inner, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
            dt_projs.append(dt_proj)
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight for p in dt_projs]))       # (K, d_inner, R)
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias for p in dt_projs]))           # (K, d_inner)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(K * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(A))                                             # (K d_inner, N)
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(K * d_inner))                                      # (K d_inner,)
        self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """ES2D on x (B, d_inner, H, W) -> out_norm(y) (B, H*W, d_inner), computed in float32 (or float64)."""
        if self._interleaved(x):
            return self._scan_interleaved(x)
        B, d, H, W = x.shape
        K, N, R = self.K, self.d_state, self.dt_rank
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        gather, scatter, _ = _lattice_index(self.orders, H, W, x.device)
        tokens = x.flatten(2).transpose(1, 2)                                              # (B, HW, d), row-major
        tokens = torch.cat([tokens, tokens.new_zeros(B, 1, d)], dim=1)                     # + the zero token
        xs = tokens.index_select(1, gather).view(B, K, -1, d).transpose(2, 3)              # (B, K, d, P)
        P = xs.shape[-1]
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight.to(xs.dtype))
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight.to(dts.dtype))
        ys = selective_scan(xs.reshape(B, K * d, P).to(ct), dts.reshape(B, K * d, P).to(ct),
                            -torch.exp(self.A_logs.to(ct)), Bs.to(ct).contiguous(), Cs.to(ct).contiguous(),
                            self.Ds.to(ct), delta_bias=self.dt_projs_bias.reshape(-1).to(ct), delta_softplus=True,
                            backend=self.scan_backend)
        ys = ys.view(B, K, d, P).transpose(2, 3).reshape(B, K * P, d)
        return self.out_norm(ys.index_select(1, scatter))       # each pixel from the one cell that scanned it

    def _interleaved(self, x: torch.Tensor) -> bool:
        """Whether `scan` runs on interleaved token-major memory: where the scan is the fused CPU kernel, which
        reads strided tensors and projects delta itself."""
        return runs_fused_cpu_kernel(self.scan_backend, x.device)

    def _scan_interleaved(self, x: torch.Tensor) -> torch.Tensor:
        """`scan` with the K lattice cells gathered into one token-major (B, P, K, d) buffer: step t of cell k at
        row t K + k, so that (B, K d, P) is its transposed view, channel c = k d + j. The fused kernel reads it
        in place, computes delta from a block-diagonal dt projection (each cell's rows of dt_in meet only its
        own channels), and writes its output in the same layout, which the scatter reads back to pixels: no
        (B, K d, P) copy of x, delta or y is made (the channel-major path makes three)."""
        from mambakit.kernels.cpu_scan import selective_scan_cpu_projected

        B, d, H, W = x.shape
        K, N, R = self.K, self.d_state, self.dt_rank
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        gather, scatter, padded = _lattice_index(self.orders, H, W, x.device, interleaved=True)
        tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, d)          # a view of a channels-last x
        if padded:
            tokens = torch.cat([tokens, tokens.new_zeros(B, 1, d)], dim=1)                 # + the zero token
        xs = tokens.index_select(1, gather).to(ct)                     # (B, P K, d)
        P = xs.shape[1] // K
        per_cell = xs.view(B * P, K, d).transpose(0, 1)                # (K, B P, d), rows K d apart
        x_dbl = torch.bmm(self.x_proj_weight.to(ct), per_cell.transpose(1, 2))            # (K, R + 2N, B P)
        x_dbl = x_dbl.view(K, R + 2 * N, B, P).permute(2, 0, 1, 3)                        # (B, K, R + 2N, P)
        dt_in = x_dbl[:, :, :R].reshape(B, K * R, P)
        dt_w = torch.block_diag(*self.dt_projs_weight.to(ct))                              # (K d, K R)
        ys = selective_scan_cpu_projected(xs.view(B, P, K * d).transpose(1, 2), dt_w, dt_in,
                                          -torch.exp(self.A_logs.to(ct)), x_dbl[:, :, R:R + N],
                                          x_dbl[:, :, R + N:], self.Ds.to(ct),
                                          delta_bias=self.dt_projs_bias.reshape(-1).to(ct), delta_softplus=True)
        ys = ys.transpose(1, 2).reshape(B, P * K, d)                   # a view: the kernel wrote (B, P, K d)
        return self.out_norm(ys.index_select(1, scatter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"SS2D: expected (batch, H, W, {self.d_model}), got {tuple(x.shape)}")
        B, H, W, _ = x.shape
        # in_proj's two halves as two GEMMs: x's is then a contiguous channels-last input of the conv
        w, bias, d = self.in_proj.weight, self.in_proj.bias, self.d_inner
        z = self.act(F.linear(x, w[d:], None if bias is None else bias[d:]))
        x = F.linear(x, w[:d], None if bias is None else bias[:d])
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))
        y = self.scan(x).to(x.dtype).view(B, H, W, self.d_inner)
        return self.dropout(self.out_proj(y * z))


_LATTICE_CACHE: dict = {}


def _lattice_index(orders, H: int, W: int, device, interleaved: bool = False):
    """The K lattice orders of an (H, W) grid as two index vectors and whether the grid is padded, cached per
    geometry: gather (K*P,) reads token t (H*W: the zero token) into scanned position k*P + j; scatter (H*W,)
    reads each pixel's output from the one scanned position that holds it. With `interleaved`, position
    (k, j) is j*K + k instead (the cells interleaved step by step). Built from core's `OrderIndices`."""
    key = (tuple(o.name for o in orders), H, W, str(device), interleaved)
    hit = _LATTICE_CACHE.get(key)
    if hit is not None:
        return hit
    idxs = [o.indices(H * W, hw=(H, W)) for o in orders]
    K, P = len(idxs), idxs[0].scan_length
    gather = torch.cat([idx.perm for idx in idxs])
    scatter = torch.full((H * W,), -1, dtype=torch.long)
    for k, idx in enumerate(idxs):
        if idx.scan_length != P:
            raise ValueError(f"SS2D: orders scan {idx.scan_length} and {P} positions; they must be equal")
        visited = idx.inverse < P
        if bool((scatter[visited] >= 0).any()):
            raise ValueError(f"SS2D: order {orders[k].name!r} revisits pixels another order scanned")
        scatter[visited] = k * P + idx.inverse[visited]
    if bool((scatter < 0).any()):
        raise ValueError(f"SS2D: orders {key[0]} leave pixels of a {H}x{W} grid unscanned")
    if interleaved:
        gather = gather.view(K, P).t().reshape(-1)
        scatter = scatter % P * K + scatter // P
    if len(_LATTICE_CACHE) > 64:
        _LATTICE_CACHE.clear()
    _LATTICE_CACHE[key] = hit = (gather.to(device), scatter.to(device), bool((gather == H * W).any()))
    return hit


class BiAttn(nn.Module):
    """EfficientVMamba's channel gate on (B, H, W, C): x * sigmoid(Linear(GELU(Linear(mean_hw(LN(x))))))."""

    def __init__(self, channels: int, act_ratio: float = 0.125):
        super().__init__()
        reduced = int(channels * act_ratio)
        self.norm = nn.LayerNorm(channels)
        self.global_reduce = nn.Linear(channels, reduced)
        self.act_fn = nn.GELU()
        self.channel_select = nn.Linear(reduced, channels)
        self.gate_fn = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(x).mean(dim=(1, 2), keepdim=True)
        return x * self.gate_fn(self.channel_select(self.act_fn(self.global_reduce(pooled))))


class VSSBlock(nn.Module):
    """The EVSS block on (B, H, W, C): SS2D branch + depthwise-conv branch, one shared channel gate, no MLP."""

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 16, ssm_ratio: float = 2.0,
                 scan_backend: str = "auto"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, scan_backend=scan_backend)
        self.conv_branch = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.BatchNorm2d(dim), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.se = BiAttn(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        conv = self.conv_branch(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.se(self.op(h)) + self.se(conv))


class SqueezeExcite(nn.Module):
    """SE on (B, C, H, W) with 1x1 convs (ReLU, sigmoid), as in the upstream `operations.py`."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.avgp = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act_fn = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate_fn = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate_fn(self.conv_expand(self.act_fn(self.conv_reduce(self.avgp(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block with SE on (B, C, H, W): 1x1 expand -> BN -> ReLU -> dw 3x3 -> BN -> ReLU -> SE ->
    1x1 -> BN, plus the input (with drop path) when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 4.0, se_ratio: float = 0.125,
                 drop_path: float = 0.0):
        super().__init__()
        mid = int(in_channels * expand_ratio)
        self.has_residual = in_channels == out_channels
        self.conv_pw = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.conv_dw = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                     nn.ReLU())
        self.se = SqueezeExcite(mid, max(1, int(mid * se_ratio)))
        self.conv_pw2 = nn.Sequential(nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_pw2(self.se(self.conv_dw(self.conv_pw(x))))
        return x + self.drop_path(y) if self.has_residual else y


class PatchMerging2D(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim): the four 2x2 neighbours concatenated (x00, x10, x01,
    x11), LayerNorm, Linear without bias. Odd sides are zero-padded."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-3:-1]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class EfficientVSSM(nn.Module):
    """EfficientVMamba. images (B, in_chans, H, W) -> logits (B, num_classes). `forward_features` gives the last
    stage's map (B, H/32, W/32, 8d), `forward_head` normalises, pools and classifies it.

    dims: an int d (stages d, 2d, 4d, 8d) or a list; depths: blocks per stage; the first `vss_stages` stages
    are EVSS blocks, the rest inverted residuals. drop_path_rate: linear over all blocks (upstream's 0.1).
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000, depths=(2, 2, 9, 2),
                 dims=96, d_state: int = 16, ssm_ratio: float = 2.0, drop_path_rate: float = 0.1,
                 vss_stages: int = 2, scan_backend: str = "auto", **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"EfficientVSSM: unexpected arguments {sorted(kwargs)}")
        depths = list(depths)
        dims = [int(dims * 2 ** i) for i in range(len(depths))] if isinstance(dims, int) else list(dims)
        if len(dims) != len(depths):
            raise ValueError(f"EfficientVSSM: {len(dims)} dims for {len(depths)} stages")
        self.num_classes = num_classes
        self.dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
                                         Permute(0, 2, 3, 1), nn.LayerNorm(dims[0]))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stage_rates = rates[sum(depths[:i]):sum(depths[:i + 1])]
            down = PatchMerging2D(dim, dims[i + 1]) if i < len(depths) - 1 else nn.Identity()
            if i < vss_stages:
                blocks = nn.Sequential(*[VSSBlock(dim, r, d_state, ssm_ratio, scan_backend) for r in stage_rates])
                self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=down)))
            else:
                irs = [InvertedResidual(dim, dim, expand_ratio=4, se_ratio=0.125, drop_path=r) for r in stage_rates]
                self.layers.append(nn.Sequential(Permute(0, 3, 1, 2), *irs, Permute(0, 2, 3, 1), down))
        self.classifier = nn.Sequential(OrderedDict(
            norm=nn.LayerNorm(dims[-1]), permute=Permute(0, 3, 1, 2), avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1), head=nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()))
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"EfficientVSSM pools by average only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier.head.apply(_init_weights)

    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """timm's custom_load hook: an upstream `.ckpt` (or our own file) through the converter; a head for
        another class count keeps its fresh initialisation."""
        from mambakit.apps.vision.convert import load_checkpoint_file, load_efficient_vmamba_weights
        load_efficient_vmamba_weights(self, load_checkpoint_file(checkpoint_path), source=str(checkpoint_path))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.patch_embed[0].in_channels:
            raise ValueError(f"EfficientVSSM: expected images (batch, {self.patch_embed[0].in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        c = self.classifier
        x = c.flatten(c.avgpool(c.permute(c.norm(x))))
        return x if pre_logits else c.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """Upstream `VSSM._init_weights`: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------
# timm registration

def checkpoint_filter_fn(state_dict: dict, model: EfficientVSSM) -> dict:
    from mambakit.apps.vision.convert import efficient_vmamba_state_dict
    return efficient_vmamba_state_dict(state_dict, model)


def _cfg(size: str, **kwargs) -> dict:
    repo = f"TerryPei/EfficientVMamba-{size.capitalize()}"
    filename = f"efficient_vmamba_{size}.ckpt"
    return {"hf_hub_id": repo, "hf_hub_filename": filename, "custom_load": "hf",
            "url": f"https://huggingface.co/{repo}/resolve/main/{filename}",
            "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.0", "classifier": "classifier.head",
            "origin_url": "https://github.com/TerryPei/EfficientVMamba", "paper_ids": "arXiv:2403.09977", **kwargs}


default_cfgs = generate_default_cfgs({
    "efficient_vmamba_tiny.in1k": _cfg("tiny"),
    "efficient_vmamba_small.in1k": _cfg("small"),
    "efficient_vmamba_base.in1k": _cfg("base"),
})


def _create(variant: str, pretrained: bool, **kwargs) -> EfficientVSSM:
    return build_model_with_cfg(EfficientVSSM, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **kwargs)


@register_model
def efficient_vmamba_tiny(pretrained: bool = False, **kwargs) -> EfficientVSSM:
    """EfficientVMamba-T: dims 48, depths [2, 2, 4, 2]; 6.5M params, ImageNet-1k top-1 76.5."""
    return _create("efficient_vmamba_tiny", pretrained, **{**dict(dims=48, depths=(2, 2, 4, 2)), **kwargs})


@register_model
def efficient_vmamba_small(pretrained: bool = False, **kwargs) -> EfficientVSSM:
    """EfficientVMamba-S: dims 64 (the trained model; the yaml says 96), depths [2, 2, 4, 2]; 11.3M, top-1 78.7."""
    return _create("efficient_vmamba_small", pretrained, **{**dict(dims=64, depths=(2, 2, 4, 2)), **kwargs})


@register_model
def efficient_vmamba_base(pretrained: bool = False, **kwargs) -> EfficientVSSM:
    """EfficientVMamba-B: dims 96, depths [2, 2, 9, 2]; 33.7M params, ImageNet-1k top-1 81.8."""
    return _create("efficient_vmamba_base", pretrained, **{**dict(dims=96, depths=(2, 2, 9, 2)), **kwargs})
