"""Building a recipe's model through timm, and loading pretrained weights into it.

The model families live one per file, as in timm: `vim.py` (Vim, ShuffleMamba) and `efficient_vmamba.py`.
Both register with timm, so a recipe names any timm model (`deit_tiny_patch16_224`, `resnet18` work too).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import DataConfig, ModelConfig
from .convert import (LoadReport, load_checkpoint_file, load_efficient_vmamba_weights, load_vim_weights,
                      load_weights_into, state_dict_from, strip_prefixes)
from .heads import classifier_name

__all__ = ["create_model", "load_weights", "resolve_weights_file"]


def create_model(model: ModelConfig, data: DataConfig, num_classes: int, *, load_pretrained: bool = True) -> nn.Module:
    """`timm.create_model(model.name, num_classes=..., in_chans=data.in_chans, img_size=data.img_size
    (models with a fixed input size), **model.kwargs)`, then `model.pretrained` loaded (head replaced)."""
    import timm

    from mambakit.apps.vision import register_timm_models

    register_timm_models()
    if not timm.is_model(model.name):
        close = timm.list_models(f"*{model.name.split('.')[0][:12]}*")[:8]
        raise ValueError(f"model.name: {model.name!r} is not a timm model"
                         + (f" (close: {', '.join(close)})" if close else "")
                         + "; the vision app's own: vim_*, efficient_vmamba_* (see `timm.list_models('vim*')`)")
    kwargs = dict(model.kwargs)
    kwargs.setdefault("in_chans", data.in_chans)
    cfg = timm.models.get_pretrained_cfg(model.name)
    if cfg is not None and cfg.fixed_input_size:
        kwargs.setdefault("img_size", data.img_size)
    try:
        net = timm.create_model(model.name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"model.kwargs: {model.name} does not take {sorted(kwargs)}: {e}") from None
    if model.pretrained and load_pretrained:
        report = load_weights(net, model.pretrained, use_ema=model.pretrained_ema)
        if report.replaced_head:
            print(f"mambakit: {model.pretrained}: new {num_classes}-class head ({', '.join(report.replaced_head)})")
    return net


def resolve_weights_file(spec: str | Path) -> Path:
    """A file or run folder as is; otherwise a registered zoo name, downloaded (and cached) on first use."""
    path = Path(spec)
    if path.exists():
        return path
    from mambakit.zoo import download_weights, get_weights

    get_weights(str(spec))          # unknown names: an error listing the registered weights
    return download_weights(str(spec))


def _read(path: Path, use_ema: bool):
    """A mambakit checkpoint or run folder (verified against its sha256 sidecar) through the engine;
    anything else (upstream files, save_pretrained files, bare state dicts) through the safe loader."""
    if path.is_dir() or path.with_name(path.name + ".sha256").is_file():
        from mambakit.engine.trainer import read_pretrained_weights
        return read_pretrained_weights(path, use_ema=use_ema)[0]
    obj = load_checkpoint_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and "state_dict" in obj:   # save_pretrained
        return obj["state_dict"]
    return obj


def load_weights(model: nn.Module, spec: str | Path, use_ema: bool = False) -> LoadReport:
    """Load NAME|PATH into `model` (strict, except a head of another class count, which stays fresh)."""
    from .efficient_vmamba import EfficientVSSM
    from .vim import VisionMamba

    path = resolve_weights_file(spec)
    obj = _read(path, use_ema)
    source = f"{spec}" if str(spec) == str(path) else f"{spec} ({path})"
    ema = use_ema and not path.is_dir() and not path.with_name(path.name + ".sha256").is_file()
    if isinstance(model, VisionMamba):
        return load_vim_weights(model, obj, use_ema=ema, source=source)
    if isinstance(model, EfficientVSSM):
        return load_efficient_vmamba_weights(model, obj, use_ema=ema, source=source)
    state = strip_prefixes(state_dict_from(obj, ema, source))
    return load_weights_into(model, state, classifier_name(model) + ".", source)
