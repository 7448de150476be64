"""Vision Mamba (Vim, hustvl/Vim) as a timm model family, with ShuffleMamba's stochastic layer-wise shuffle.

    import mambakit.apps.vision, timm
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, num_classes=10)

Architecture (upstream `vim/models_mamba.py`, `VisionMamba` with `bimamba_type="v2"`), image (B, C, H, W):

    x = patch_embed(img)                      Conv2d(kernel=patch, stride) -> (B, M, D), M = grid_h * grid_w
    x = insert cls_token at M // 2            the "middle class token" (index 98 of 197 at 224 px, patch 16)
    x = x + pos_embed                         absolute, (1, M + 1, D), added after the insertion
    hidden, residual = x, None
    for layer i:                              core Block: residual = residual + drop_path_i(hidden)
        hidden, residual = layers[i](...)     (hidden alone at i = 0), kept in fp32; hidden = mixer(RMSNorm(residual))
    hidden = norm_f(residual + drop_path(hidden))
    logits = head(hidden[:, M // 2])

The mixer is core's `MultiOrderMamba` with orders (identity, flip), shared in_proj / out_proj / z gate, a
second parameter set `conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`, and the two directions averaged
before out_proj (`if_divide_out=True`). Both directions are computed on every path (upstream's non-fused
path silently drops the backward one). Drop path: layer i gets ([0] + linspace(0, rate, depth))[i] (the
"shifted" schedule), the final add gets `rate`. Parameter names are upstream's, so a published checkpoint
loads with strict=True after `convert.vim_state_dict` (which only picks the weights out of the file).

Initialisation reproduces upstream (`upstream_init=True`): patch conv lecun-normal, head and the two tokens
trunc-normal(0.02), mamba_ssm's `_init_weights` (Linear biases zeroed, out_proj rescaled by 1/sqrt(depth)),
and -- Vim's quirk -- `dt_proj_b.bias` zeroed (upstream never marks it `_no_reinit`), so the backward
direction starts at softplus(0) = 0.69 for every channel.

ShuffleMamba (huangzizheng01/ShuffleMamba, `shuffle_forward`): with `shuffle_rate > 0`, in training, layer i
is run on a randomly permuted sequence with probability linspace(0, shuffle_rate, depth)[i]: one coin per
layer per forward (`torch.rand(1)`), one permutation for the whole batch (class token included), hidden and
residual permuted before the layer and restored with the inverse after it. Nothing changes at eval. The coins
and permutations of a forward are drawn before its first layer (`shuffle_plan`), layer by layer in the same
order, so a batch run in parts shares them.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import lecun_normal_, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from mambakit.core import DropPath, RMSNorm, create_block, drop_path_schedule, init_weights
from mambakit.core.layout import cpu_batch_chunk
from mambakit.core.orders import OrderIndices, RandomShuffle, reorder, restore

__all__ = ["VisionMamba", "PatchEmbed", "shuffle_probabilities", "VIM_MODELS"]

VIM_MODELS = ("vim_tiny_patch16_224", "vim_tiny_patch16_stride8_224", "vim_small_patch16_224",
              "vim_small_patch16_stride8_224", "vim_base_patch16_224")
CLS_POSITIONS = ("middle", "head", "none")


def shuffle_probabilities(rate: float, depth: int) -> list[float]:
    """ShuffleMamba's per-layer shuffle probabilities: linspace(0, rate, depth) (0 at the first layer)."""
    return torch.linspace(0, rate, depth).tolist() if depth > 0 else []


class PatchEmbed(nn.Module):
    """Conv2d patchify: (B, C, H, W) -> (B, grid_h * grid_w, D), grid = (H - patch) // stride + 1.

    dynamic=False (upstream): the input must be `img_size`; dynamic=True accepts any size >= patch.
    """

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192, dynamic=False):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.dynamic = dynamic
        self.grid_size = self.grid_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def grid_for(self, hw) -> tuple[int, int]:
        h, w = hw
        ph, pw = self.patch_size
        if h < ph or w < pw:
            raise ValueError(f"PatchEmbed: an image of {h}x{w} pixels is smaller than one {ph}x{pw} patch")
        return (h - ph) // self.stride[0] + 1, (w - pw) // self.stride[1] + 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"VisionMamba: expected images (batch, {self.proj.in_channels}, H, W), got shape "
                             f"{tuple(x.shape)}")
        hw = tuple(x.shape[-2:])
        if not self.dynamic and hw != self.img_size:
            raise ValueError(f"VisionMamba: input size {hw[0]}x{hw[1]} does not match the model's img_size "
                             f"{self.img_size[0]}x{self.img_size[1]}; build the model with img_size={hw[0]} "
                             f"(pretrained position embeddings are resized on load) or dynamic_img_size=True")
        grid = self.grid_for(hw)
        return self.proj(x).flatten(2).transpose(1, 2), grid


def _segm_init(module: nn.Module) -> None:
    """Upstream's `segm_init_weights` for the patch embedding and the head."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VisionMamba(nn.Module):
    """Vim. images (B, in_chans, H, W) -> logits (B, num_classes); `forward_features` gives the normalised
    tokens (B, M + 1, D) and `forward_head` pools them (the class token, or the mean with global_pool="avg").

    Upstream arguments: img_size, patch_size, stride (default patch_size), depth, embed_dim, d_state,
    drop_rate (dropout after the position embedding), drop_path_rate, norm_epsilon, rms_norm,
    residual_in_fp32, if_divide_out. cls_token_position: "middle" (upstream's published models), "head" (index
    0, DeiT style) or "none" (then global_pool must be "avg"). shuffle_rate: ShuffleMamba (0 = off).
    dynamic_img_size: accept other input sizes, resampling the position embedding on the fly.
    scan_backend goes to core's `selective_scan`.
    """

    def __init__(self, img_size=224, patch_size=16, stride=None, in_chans=3, num_classes=1000, embed_dim=192,
                 depth=24, d_state=16, d_conv=4, expand=2, drop_rate=0.0, drop_path_rate=0.1, norm_epsilon=1e-5,
                 rms_norm=True, residual_in_fp32=True, if_divide_out=True, cls_token_position="middle",
                 global_pool="token", shuffle_rate=0.0, dynamic_img_size=False, upstream_init=True,
                 scan_backend="auto", **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"VisionMamba: unexpected arguments {sorted(kwargs)}")
        if cls_token_position not in CLS_POSITIONS:
            raise ValueError(f"VisionMamba: cls_token_position must be one of {CLS_POSITIONS}, got "
                             f"{cls_token_position!r}")
        _check_pool(global_pool, cls_token_position)
        if not 0.0 <= shuffle_rate <= 1.0:
            raise ValueError(f"VisionMamba: shuffle_rate is a probability in [0, 1], got {shuffle_rate}")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.depth = depth
        self.cls_token_position = cls_token_position
        self.global_pool = global_pool
        self.num_prefix_tokens = 0 if cls_token_position == "none" else 1
        self.dynamic_img_size = dynamic_img_size
        self.shuffle_rate = float(shuffle_rate)
        self.shuffle_probs = shuffle_probabilities(self.shuffle_rate, depth)

        self.patch_embed = PatchEmbed(img_size, patch_size, stride or patch_size, in_chans, embed_dim,
                                      dynamic=dynamic_img_size)
        if self.num_prefix_tokens:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens,
                                                  embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        rates = drop_path_schedule(drop_path_rate, depth)
        ssm_cfg = {"layer": "MultiOrder", "orders": ("identity", "flip"),
                   "merge": "mean" if if_divide_out else "sum", "d_state": d_state, "d_conv": d_conv,
                   "expand": expand, "scan_backend": scan_backend}
        self.layers = nn.ModuleList([
            create_block(embed_dim, i, ssm_cfg=ssm_cfg, norm_epsilon=norm_epsilon, rms_norm=rms_norm,
                         residual_in_fp32=residual_in_fp32, drop_path=rates[i])
            for i in range(depth)])
        self.drop_path = DropPath(rates[-1]) if rates[-1] > 0 else nn.Identity()
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(embed_dim, eps=norm_epsilon)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if upstream_init:
            self._upstream_init()

    # -- initialisation ------------------------------------------------------------------------------
    def _upstream_init(self) -> None:
        self.patch_embed.apply(_segm_init)
        self.head.apply(_segm_init)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.num_prefix_tokens:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(init_weights, n_layer=self.depth))
        with torch.no_grad():
            for layer in self.layers:
                layer.mixer.dt_proj_b.bias.zero_()

    # -- timm API ------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes` classes (upstream's head init); pooling may change too."""
        if global_pool is not None:
            _check_pool(global_pool, self.cls_token_position)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_segm_init)

    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """timm's `custom_load` hook: load an upstream Vim file (or our own) with the converter. The position
        embedding is resized to this model's grid; a head for another class count is left as initialised."""
        from mambakit.apps.vision.convert import load_checkpoint_file, load_vim_weights
        load_vim_weights(self, load_checkpoint_file(checkpoint_path), source=str(checkpoint_path))

    # -- forward -------------------------------------------------------------------------------------
    def cls_index(self, num_patches: int) -> int | None:
        """Where the class token sits among num_patches + 1 tokens (None without one)."""
        return {"middle": num_patches // 2, "head": 0, "none": None}[self.cls_token_position]

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, M, _ = x.shape
        idx = self.cls_index(M)
        if idx is not None:
            cls = self.cls_token.expand(B, -1, -1)
            x = torch.cat([x[:, :idx], cls, x[:, idx:]], dim=1)
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:
            from mambakit.apps.vision.convert import resize_pos_embed
            pos = resize_pos_embed(pos, self.patch_embed.grid_size, grid, self.cls_token_position)
        return self.pos_drop(x + pos)

    def shuffle_plan(self, num_tokens: int, device=None) -> list[OrderIndices | None]:
        """ShuffleMamba's draw for one forward: per layer, the permutation its tokens are run in, or None. One
        coin per layer per training forward (drawn even where the probability is 0, as upstream does); nothing
        is drawn at eval or with shuffle_rate 0."""
        if not (self.training and self.shuffle_rate > 0):
            return [None] * len(self.layers)
        return [RandomShuffle().indices(num_tokens, device=device) if torch.rand(1).item() < p else None
                for p in self.shuffle_probs]

    @staticmethod
    def _run_layer(layer: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None,
                   idx: OrderIndices | None = None):
        """One layer, on the tokens in the order of `idx` (a `shuffle_plan` entry; None: as they are)."""
        if idx is None:
            return layer(hidden, residual)
        hidden = reorder(hidden, idx)
        residual = reorder(residual, idx) if residual is not None else None
        hidden, residual = layer(hidden, residual)
        return restore(hidden, idx), restore(residual, idx)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, M + 1, D) (class token included, at `cls_index(M)`).

        On the CPU a large batch of large images runs in parts that keep each layer's activations in cache
        (`mambakit.core.layout.cpu_batch_chunk`), in training too (the backward then runs part by part); every
        sample is computed alone either way, and the parts share one ShuffleMamba draw."""
        chunk, num_tokens = x.shape[0], None
        if x.dim() == 4:
            gh, gw = self.patch_embed.grid_for(x.shape[-2:])
            num_tokens = gh * gw + self.num_prefix_tokens
            chunk = cpu_batch_chunk(x, num_tokens)
        plan = self.shuffle_plan(num_tokens, x.device) if num_tokens is not None else None
        if chunk < x.shape[0]:
            return torch.cat([self._forward_features(part, plan) for part in x.split(chunk)])
        return self._forward_features(x, plan)

    def _forward_features(self, x: torch.Tensor, plan: list[OrderIndices | None] | None = None) -> torch.Tensor:
        x, grid = self.patch_embed(x)
        hidden, residual = self._pos_embed(x, grid), None
        plan = self.shuffle_plan(hidden.shape[1], hidden.device) if plan is None else plan
        for layer, idx in zip(self.layers, plan):
            hidden, residual = self._run_layer(layer, hidden, residual, idx)
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, L, D) -> logits (B, num_classes), or the pooled features (B, D) with pre_logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        else:
            x = x[:, self.cls_index(x.shape[1] - self.num_prefix_tokens)]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str, cls_token_position: str) -> None:
    if global_pool not in ("token", "avg"):
        raise ValueError(f"VisionMamba: global_pool must be 'token' or 'avg', got {global_pool!r}")
    if global_pool == "token" and cls_token_position == "none":
        raise ValueError("VisionMamba: global_pool='token' needs a class token; use cls_token_position "
                         "'middle' or 'head', or global_pool='avg'")


# ---------------------------------------------------------------------------------------------------------
# timm registration

def checkpoint_filter_fn(state_dict: dict, model: VisionMamba) -> dict:
    """timm's pretrained_filter_fn: an upstream checkpoint (or its 'model' entry) -> this model's state dict
    (position embedding resized to the model's grid)."""
    from mambakit.apps.vision.convert import vim_state_dict
    return vim_state_dict(state_dict, model)


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    return build_model_with_cfg(VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **kwargs)


def _cfg(hf_hub_id: str, filename: str, **kwargs) -> dict:
    # custom_load="hf": timm hands the downloaded file (hf-hub, url or a local `file` overlay) to
    # VisionMamba.load_pretrained, which picks the 'model' entry of upstream's training checkpoint (timm's
    # own loader would prefer 'model_ema' for a file and the whole checkpoint for the hub).
    return {"hf_hub_id": hf_hub_id, "hf_hub_filename": filename, "custom_load": "hf",
            "url": f"https://huggingface.co/{hf_hub_id}/resolve/main/{filename}",
            "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0", "origin_url": "https://github.com/hustvl/Vim", "paper_ids": "arXiv:2401.09417",
            **kwargs}


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.in1k": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_tiny_patch16_stride8_224.in1k": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_224.in1k": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim_small_patch16_stride8_224.in1k": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth"),
    "vim_base_patch16_224.in1k": _cfg("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
})


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti: 192 wide, 24 layers, patch 16 (196 patches + the middle class token). ImageNet-1k top-1 76.1."""
    return _create("vim_tiny_patch16_224", pretrained, **{**dict(patch_size=16, embed_dim=192, depth=24), **kwargs})


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti+: Vim-Ti with overlapping patches (stride 8, 27x27 grid), fine-tuned 30 epochs. Top-1 78.3."""
    return _create("vim_tiny_patch16_stride8_224", pretrained,
                   **{**dict(patch_size=16, stride=8, embed_dim=192, depth=24), **kwargs})


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: 384 wide, 24 layers, patch 16. ImageNet-1k top-1 80.5."""
    return _create("vim_small_patch16_224", pretrained, **{**dict(patch_size=16, embed_dim=384, depth=24), **kwargs})


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S+: Vim-S with stride-8 patches, fine-tuned 30 epochs. ImageNet-1k top-1 81.6."""
    return _create("vim_small_patch16_stride8_224", pretrained,
                   **{**dict(patch_size=16, stride=8, embed_dim=384, depth=24), **kwargs})


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B: 768 wide, 24 layers, patch 16. ImageNet-1k top-1 81.9. Upstream defines no stride-8 base."""
    return _create("vim_base_patch16_224", pretrained, **{**dict(patch_size=16, embed_dim=768, depth=24), **kwargs})
