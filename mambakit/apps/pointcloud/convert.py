"""Load SkyworkAI/PointCloudMamba checkpoints into this app's PCM models.

Our modules carry upstream's names (`encoder.*`, `prediction.head.*` for BaseCls; `encoder.*`, `decoder.*`,
`head.head.*` for BasePartSeg), so conversion is unwrapping and prefix stripping:

- the checkpoint file is a dict; the weights sit under one of `model`, `net`, `network`, `state_dict`,
  `base_model` (the keys openpoints' loader accepts; upstream saves `model`), possibly nested;
- DataParallel / DDP prefixes `module.` are stripped.

One thing cannot be read from a checkpoint: which rows of `encoder.order_prompt.weight` belong to which scan
order. Upstream assigns the 6-row blocks in the iteration order of `set(mamba_layers_orders)`, and Python's
string hashing is randomised per process unless PYTHONHASHSEED is fixed, so the layout depends on the
training process. Ours assigns blocks in order of first appearance in the layer list. Pass `prompt_orders`
(the order of each block in the checkpoint, e.g. reproduced by running upstream's constructor under the
training run's PYTHONHASHSEED) to move the blocks into our layout; without it the rows load as they are.

Published weights were trained with upstream HEAD's `encode_cts`; build the model with `cts="as_written"` to
evaluate them as trained.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Sequence

import torch
from torch import nn

__all__ = ["load_upstream_checkpoint", "load_pcm", "read_pretrained", "WRAPPER_KEYS"]

#: keys under which openpoints' checkpoints keep the weights, in the order its loader tries them
WRAPPER_KEYS = ("model", "net", "network", "state_dict", "base_model")
_PROMPT_KEY = "order_prompt.weight"
_SHOWN = 12


def _read(path_or_dict, weights_only: bool) -> Mapping:
    if isinstance(path_or_dict, Mapping):
        return path_or_dict
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise TypeError(f"expected a checkpoint path or a dict, got {type(path_or_dict).__name__}")
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PCM checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and the way out
        hint = (" If you trust this file, pass weights_only=False (it may hold pickled Python objects "
                "besides tensors, e.g. the optimizer or the config).") if weights_only else ""
        raise RuntimeError(f"could not read PCM checkpoint {path!r}: {e}.{hint}") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"PCM checkpoint {path!r} holds a {type(ckpt).__name__}, expected a dict of tensors "
                         f"or a dict with one of {WRAPPER_KEYS}")
    return ckpt


def _unwrap(ckpt: Mapping) -> Mapping:
    """Descend through wrapper keys until a mapping of tensors is reached."""
    while not any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        inner = next((ckpt[k] for k in WRAPPER_KEYS if isinstance(ckpt.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"the checkpoint holds no tensors and none of the keys {WRAPPER_KEYS}; its keys are "
                             f"{sorted(map(str, ckpt))[:_SHOWN]}")
        ckpt = inner
    return ckpt


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _reorder_prompts(state: dict, prompt_orders: Sequence[str], layer_orders: Sequence[str]) -> None:
    """Move the checkpoint's prompt blocks (block i belongs to prompt_orders[i]) into our layout: one block
    per distinct order of `layer_orders`, in order of first appearance."""
    norm = [str(o).lower().replace("-", "_") for o in prompt_orders]
    ours = list(dict.fromkeys(str(o).lower().replace("-", "_") for o in layer_orders))
    if sorted(norm) != sorted(ours):
        raise ValueError(f"prompt_orders {list(prompt_orders)} must name each of the model's orders {ours} once")
    keys = [k for k in state if k == _PROMPT_KEY or k.endswith("." + _PROMPT_KEY)]
    if not keys:
        raise ValueError(f"prompt_orders given, but the checkpoint has no {_PROMPT_KEY!r}")
    for key in keys:
        weight = state[key]
        if weight.shape[0] % len(norm):
            raise ValueError(f"{key} has {weight.shape[0]} rows, not a multiple of {len(norm)} orders")
        blocks = weight.chunk(len(norm), dim=0)
        state[key] = torch.cat([blocks[norm.index(o)] for o in ours], dim=0)


def load_upstream_checkpoint(path_or_dict, prompt_orders: Sequence[str] | None = None,
                             layer_orders: Sequence[str] | None = None, weights_only: bool = True) -> dict:
    """An upstream PCM checkpoint (a path, or an already loaded dict) -> a state_dict in our key layout.

    prompt_orders / layer_orders: see the module docstring (both or neither; `load_pcm` supplies
    layer_orders from the model). weights_only: torch.load's safe mode (tensors only)."""
    state = {_strip_module(str(k)): v for k, v in _unwrap(_read(path_or_dict, weights_only)).items()}
    if prompt_orders is not None:
        if layer_orders is None:
            raise ValueError("prompt_orders needs layer_orders (the model's per-layer orders) to know our layout")
        _reorder_prompts(state, prompt_orders, layer_orders)
    return state


def _encoder_of(model: nn.Module):
    return getattr(model, "encoder", model)


def load_pcm(model: nn.Module, path_or_dict, prompt_orders: Sequence[str] | None = None,
             weights_only: bool = True) -> nn.Module:
    """Load an upstream PCM checkpoint into `model` strictly; returns the model. Every missing, unexpected or
    wrongly shaped key is reported in one error (with the first few of each kind) before anything is loaded."""
    layer_orders = getattr(_encoder_of(model), "layer_orders", None)
    if prompt_orders is not None and layer_orders is None:
        raise ValueError("prompt_orders given, but the model has no PCM encoder (layer_orders)")
    state = load_upstream_checkpoint(path_or_dict, prompt_orders, layer_orders, weights_only)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
                parts.append(f"{len(items)} {what}: " + ", ".join(items[:_SHOWN]) + more)
        raise RuntimeError(f"the PCM checkpoint does not match {type(model).__name__} (check the model name, "
                           f"n_classes, in_channels and architecture kwargs): " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def read_pretrained(spec: str | os.PathLike) -> dict:
    """`model.pretrained` as a state dict: a mambakit run folder or checkpoint (verified by its sidecar hash),
    or an upstream PCM checkpoint file (unwrapped and mapped by `load_upstream_checkpoint`)."""
    from pathlib import Path

    from mambakit.engine.trainer import read_pretrained_weights

    path = Path(spec)
    if path.is_dir() or path.with_name(path.name + ".sha256").is_file():
        return read_pretrained_weights(path)[0]
    return load_upstream_checkpoint(path)
