"""Top-k labels for image files, from a training run (its recipe, classes and weights) or from pretrained
weights (a zoo name, with ImageNet's class names for 1000-class heads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["predict", "format_predictions", "load_for_prediction"]


def _open_image(path: str | Path, in_chans: int):
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    try:
        with Image.open(path) as img:
            return img.convert("L").convert("RGB") if in_chans == 1 else img.convert("RGB")
    except OSError as e:
        raise OSError(f"{path}: cannot read the image: {e}") from None


def _recipe_transform(config, model: nn.Module) -> Callable:
    """The evaluation transform of a recipe: (PIL image) -> (in_chans, H, W)."""
    data = config.data
    if data.source == "mnist5k":
        import numpy as np

        from .data import MNIST_MEAN, MNIST_STD
        mean = torch.tensor(data.mean or MNIST_MEAN).view(-1, 1, 1)
        std = torch.tensor(data.std or MNIST_STD).view(-1, 1, 1)

        def digits(img):
            grey = img.convert("L").resize((data.img_size, data.img_size))
            x = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None]
            return (x.repeat(data.in_chans, 1, 1) - mean) / std
        return digits
    from .data import build_transforms
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    _, evaluate = build_transforms(data, config.augment, data.mean or cfg.get("mean") or (0.485, 0.456, 0.406),
                                   data.std or cfg.get("std") or (0.229, 0.224, 0.225))
    return lambda img: evaluate(img)[:data.in_chans]


def _from_checkpoint(checkpoint: str | Path, use_ema: bool):
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint
    from mambakit.engine.config import from_dict
    from mambakit.engine.trainer import load_model_state

    from .config import VisionRecipe
    from .task import CLASSES_FILE, VisionTask

    path = resolve_checkpoint(checkpoint, prefer="best")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or state.get("app") not in (None, "vision"):
        raise ValueError(f"{path}: not a vision training checkpoint (app {state.get('app')!r})")
    config = from_dict(VisionRecipe, state["config"], f"{path} (saved config)")
    task = VisionTask(config, load_pretrained=False)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (run_dir / CLASSES_FILE).is_file():
        task._classes = json.loads((run_dir / CLASSES_FILE).read_text())
    model = task.build_model()
    weights = state.get("ema" if use_ema else "model")
    if weights is None:
        raise ValueError(f"{path} holds no EMA weights (the run had train.ema_decay unset)")
    load_model_state(model, weights, str(path))
    return model, _recipe_transform(config, model), task.classes, config.data.in_chans


def _from_pretrained(spec: str, model_name: str | None):
    import timm

    from mambakit.apps.vision import register_timm_models

    from .convert import state_dict_from, strip_prefixes
    from .heads import classifier_name
    from .models import _read, load_weights, resolve_weights_file

    register_timm_models()
    kwargs = {}
    if model_name is None:
        if Path(spec).exists():
            raise ValueError(f"{spec}: a weights file does not say its architecture; add --model TIMM_NAME")
        from mambakit.zoo import get_weights
        entry = get_weights(spec)
        model_name, kwargs = entry.builder.split(":")[1], dict(entry.config)
    model = timm.create_model(model_name, **kwargs)
    state = strip_prefixes(state_dict_from(_read(resolve_weights_file(spec), False), False, str(spec)))
    head = state.get(classifier_name(model) + ".weight")
    if head is not None and head.shape[0] != model.num_classes:
        model.reset_classifier(head.shape[0])
    load_weights(model, spec)
    n = model.num_classes
    if n == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        classes = [info.index_to_description(i) for i in range(n)]
    else:
        classes = [f"class {i}" for i in range(n)]
    from timm.data import create_transform, resolve_model_data_config
    data_cfg = resolve_model_data_config(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:                    # a model built for another resolution than its pretrained cfg
        data_cfg["input_size"] = (3, *img_size)
    transform = create_transform(**data_cfg)
    return model, transform, classes, 3


def load_for_prediction(checkpoint=None, pretrained=None, model_name=None, use_ema=False):
    """(model in eval mode, transform, class names, in_chans) from a run or from pretrained weights."""
    if (checkpoint is None) == (pretrained is None):
        raise ValueError("predict: give exactly one of checkpoint and pretrained")
    model, transform, classes, in_chans = (_from_checkpoint(checkpoint, use_ema) if checkpoint is not None
                                           else _from_pretrained(pretrained, model_name))
    return model.eval(), transform, classes, in_chans


def predict(images: Sequence[str | Path], checkpoint=None, pretrained=None, model_name=None, topk: int = 5,
            use_ema: bool = False, batch_size: int = 16) -> list[dict]:
    """[{"image": path, "top": [{"label", "index", "prob"}, ...]}] for each image, best first."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    model, transform, classes, in_chans = load_for_prediction(checkpoint, pretrained, model_name, use_ema)
    results = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            x = torch.stack([transform(_open_image(p, in_chans)) for p in chunk])
            probs = torch.softmax(model(x).float(), dim=-1)
            top = probs.topk(min(topk, probs.shape[1]), dim=-1)
            for path, p, i in zip(chunk, top.values.tolist(), top.indices.tolist()):
                results.append({"image": str(path), "top": [{"label": classes[j], "index": j, "prob": round(q, 6)}
                                                            for q, j in zip(p, i)]})
    return results


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"])
        lines += [f"  {t['prob']:.4f}  {t['label']}" for t in r["top"]]
    return "\n".join(lines)
