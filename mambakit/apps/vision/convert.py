"""Upstream checkpoints -> mambakit vision models, and position-embedding resizing.

Files as published:
- Vim (hustvl/Vim, `vim_*_midclstok_*.pth`): DeiT's training checkpoint, a dict {'model', 'model_ema',
  'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args'} whose 'args' is a pickled `argparse.Namespace`.
  Keys are already ours (`patch_embed.proj.*`, `cls_token`, `pos_embed`, `layers.{i}.norm.weight`,
  `layers.{i}.mixer.{in_proj, conv1d, conv1d_b, x_proj, x_proj_b, dt_proj, dt_proj_b, A_log, A_b_log, D, D_b,
  out_proj}`, `norm_f.weight`, `head.*`): conversion picks 'model' (upstream evaluates it; `use_ema=True`
  takes 'model_ema') and resizes `pos_embed` to the target grid.
- EfficientVMamba (TerryPei/EfficientVMamba, `efficient_vmamba_{tiny,small,base}.ckpt`): {'state_dict': ...}
  with keys prefixed `module.module.` (a DDP-wrapped EMA wrapper); conversion strips the prefixes.

Files are read with `torch.load(weights_only=True)`, allowing only `argparse.Namespace` beyond tensors and
containers (as timm does), so no code from the file runs.

Position embeddings at another resolution: upstream's fine-tune path (DeiT's `--finetune`) treats index 0
as the class token, but Vim's sits in the middle (index M // 2), so it would resample a grid that has the
class token spliced into it. `resize_pos_embed` takes the class token out at its own index, resizes the
(gh, gw) grid bicubically (align_corners=False, as upstream) and puts the token back at the new middle.
"""

from __future__ import annotations

import argparse
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["load_checkpoint_file", "state_dict_from", "strip_prefixes", "resize_pos_embed", "vim_from_upstream",
           "vim_state_dict", "load_vim_weights", "efficient_vmamba_from_upstream", "efficient_vmamba_state_dict",
           "load_efficient_vmamba_weights", "load_weights_into", "LoadReport"]

_MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module")
_EMA_KEYS = ("model_ema", "state_dict_ema", "ema_model", "ema")


def load_checkpoint_file(path: str | Path) -> Any:
    """Read a checkpoint on the CPU without running code from it (tensors, containers, argparse.Namespace);
    .safetensors files through safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: the file pickles Python objects other than tensors and argparse.Namespace, so "
                         f"it is not read (weights_only=True: {first}). If you trust it, load it yourself with "
                         f"torch.load(path, weights_only=False) and pass the result to the converter") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from None


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def state_dict_from(obj: Any, use_ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: the mapping itself, or the entry under a conventional key
    ('model' / 'state_dict' / ..., or the EMA entry with use_ema). mambakit training checkpoints keep the EMA
    under 'ema', `save_pretrained` files under 'state_dict'."""
    if _is_tensor_mapping(obj):
        if use_ema:
            raise ValueError(f"{source}: a bare state dict has no EMA weights (use_ema=True)")
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    for key in (_EMA_KEYS if use_ema else _MODEL_KEYS):
        if _is_tensor_mapping(obj.get(key)):
            return dict(obj[key])
    wanted = "EMA weights under " + "/".join(_EMA_KEYS) if use_ema else "a state dict under " + "/".join(_MODEL_KEYS)
    raise ValueError(f"{source}: no {wanted} (top-level keys: {', '.join(map(str, list(obj)[:12]))})")


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes=("module.",)) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP's / EMA's 'module.') from every key, as often as they repeat."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if key.startswith(p):
                    key, stripped = key[len(p):], True
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# position embeddings

def _cls_index(position: str, num_patches: int) -> int | None:
    if position not in ("middle", "head", "none"):
        raise ValueError(f"cls_token_position must be 'middle', 'head' or 'none', got {position!r}")
    return {"middle": num_patches // 2, "head": 0, "none": None}[position]


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     cls_token_position: str = "middle") -> torch.Tensor:
    """(1, gh*gw [+1], D) on old_grid -> (1, nh*nw [+1], D) on new_grid, the class token (if any) taken out at
    its index (middle: gh*gw // 2; head: 0) and put back at the new one. Bicubic, align_corners=False."""
    old_grid, new_grid = tuple(int(v) for v in old_grid), tuple(int(v) for v in new_grid)
    n_old = old_grid[0] * old_grid[1]
    idx_old = _cls_index(cls_token_position, n_old)
    prefix = 0 if idx_old is None else 1
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != n_old + prefix:
        raise ValueError(f"resize_pos_embed: pos_embed has shape {tuple(pos_embed.shape)}, expected "
                         f"(1, {n_old + prefix}, D) for a {old_grid[0]}x{old_grid[1]} grid"
                         + (" plus the class token" if prefix else ""))
    if old_grid == new_grid:
        return pos_embed
    if idx_old is None:
        grid_tokens, cls = pos_embed, None
    else:
        cls = pos_embed[:, idx_old:idx_old + 1]
        grid_tokens = torch.cat([pos_embed[:, :idx_old], pos_embed[:, idx_old + 1:]], dim=1)
    D = pos_embed.shape[-1]
    grid = grid_tokens.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    grid_tokens = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)
    if cls is None:
        return grid_tokens
    idx_new = _cls_index(cls_token_position, new_grid[0] * new_grid[1])
    return torch.cat([grid_tokens[:, :idx_new], cls, grid_tokens[:, idx_new:]], dim=1)


def _square_grid(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}: {n} patch positions are not a square grid; give the checkpoint's grid")
    return side, side


# ---------------------------------------------------------------------------------------------------------
# Vim

def vim_from_upstream(obj: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """A loaded Vim file (upstream's training checkpoint, a bare state dict, or a mambakit checkpoint) -> the
    state dict of `VisionMamba` at the checkpoint's own resolution. This is the zoo's converter."""
    state = strip_prefixes(state_dict_from(obj, use_ema, "Vim checkpoint"))
    missing = [k for k in ("pos_embed", "patch_embed.proj.weight", "norm_f.weight") if k not in state]
    if missing or not any(k.endswith("mixer.A_b_log") for k in state):
        raise ValueError(f"Vim checkpoint: not a Vim (bimamba v2) state dict; missing "
                         f"{missing or ['layers.*.mixer.A_b_log']} (keys start: {', '.join(list(state)[:6])})")
    return state


def vim_state_dict(obj: Any, model: nn.Module, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """A loaded Vim file -> `model`'s state dict: the weights picked and `pos_embed` resized to model's grid
    (the checkpoint's grid is taken as square)."""
    state = vim_from_upstream(obj, use_ema)
    position = getattr(model, "cls_token_position", "middle")
    prefix = 0 if position == "none" else 1
    pos = state["pos_embed"]
    old_grid = _square_grid(pos.shape[1] - prefix, "Vim checkpoint pos_embed")
    new_grid = tuple(model.patch_embed.grid_size)
    if old_grid != new_grid:
        state["pos_embed"] = resize_pos_embed(pos, old_grid, new_grid, position)
    return state


# ---------------------------------------------------------------------------------------------------------
# EfficientVMamba

def efficient_vmamba_from_upstream(obj: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """A loaded EfficientVMamba file ({'state_dict': {'module.module.*': ...}}) -> `EfficientVSSM`'s state
    dict. This is the zoo's converter."""
    state = strip_prefixes(state_dict_from(obj, use_ema, "EfficientVMamba checkpoint"))
    if "patch_embed.0.weight" not in state or not any(k.endswith("op.A_logs") for k in state):
        raise ValueError(f"EfficientVMamba checkpoint: not an EfficientVSSM state dict (no patch_embed.0.weight "
                         f"or layers.*.blocks.*.op.A_logs; keys start: {', '.join(list(state)[:6])})")
    return state


def efficient_vmamba_state_dict(obj: Any, model: nn.Module, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """timm's filter: EfficientVMamba has no position embedding, so the weights load at any resolution."""
    return efficient_vmamba_from_upstream(obj, use_ema)


# ---------------------------------------------------------------------------------------------------------
# loading with head replacement

class LoadReport:
    """What `load_weights_into` did: `replaced_head` lists the classifier keys left as initialised."""

    def __init__(self, loaded: int, replaced_head: list[str]):
        self.loaded = loaded
        self.replaced_head = replaced_head

    def __repr__(self) -> str:
        return f"LoadReport(loaded={self.loaded}, replaced_head={self.replaced_head})"


def load_weights_into(model: nn.Module, state: Mapping[str, torch.Tensor], head_prefix: str,
                      source: str = "checkpoint") -> LoadReport:
    """Load `state` strictly, except a classifier (keys under `head_prefix`) whose shape differs from the
    model's (another class count): that one keeps the model's fresh initialisation (fine-tuning)."""
    own = model.state_dict()
    state = dict(state)
    head_keys = [k for k in own if k.startswith(head_prefix)]
    replaced = [k for k in head_keys if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if replaced or (head_keys and not any(k in state for k in head_keys)):
        replaced = head_keys
        for k in list(state):
            if k.startswith(head_prefix):
                del state[k]
    missing = [k for k in own if k not in state and k not in replaced]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {t}: {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}"
                 for t, v in (("missing keys", missing), ("unexpected keys", unexpected),
                              ("shape mismatches", shapes)) if v]
        raise ValueError(f"{source} does not fit {type(model).__name__} (another size or in_chans?): "
                         + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return LoadReport(len(state), replaced)


def load_vim_weights(model: nn.Module, obj: Any, use_ema: bool = False, source: str = "Vim checkpoint") -> LoadReport:
    """Load a Vim file (already read) into `model`: weights picked, pos_embed resized, other-sized head kept."""
    return load_weights_into(model, vim_state_dict(obj, model, use_ema), "head.", source)


def load_efficient_vmamba_weights(model: nn.Module, obj: Any, use_ema: bool = False,
                                  source: str = "EfficientVMamba checkpoint") -> LoadReport:
    return load_weights_into(model, efficient_vmamba_state_dict(obj, model, use_ema), "classifier.head.", source)
