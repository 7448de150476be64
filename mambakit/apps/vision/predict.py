"""Top-k labels for image files, from a training run (its recipe, classes and weights) or from pretrained
weights (a zoo name, with ImageNet's class names for 1000-class heads).

A run's images go through the run's evaluation transform (`VisionTask.eval_transform`: the val / test
datasets' own reading, resize and centre crop, no augmentation), so `predict` gives the probabilities the
evaluation loop computes for the same files. An image that cannot be read is reported in its place
(`{"image": path, "error": message}`) and the others are still predicted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from mambakit.data.errors import DataError

__all__ = ["predict", "format_predictions", "load_for_prediction"]


def _from_checkpoint(checkpoint: str | Path, use_ema: bool):
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint, run_dir_of
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
    run_dir = run_dir_of(path)
    if (run_dir / CLASSES_FILE).is_file():
        task._classes = json.loads((run_dir / CLASSES_FILE).read_text())
    model = task.build_model()
    weights = state.get("ema" if use_ema else "model")
    if weights is None:
        raise ValueError(f"{path} holds no EMA weights (the run had train.ema_decay unset)")
    load_model_state(model, weights, str(path))
    return model, task.eval_transform(), task.classes


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
    from .data import read_image
    return model, lambda path: transform(read_image(path, 3)), classes


def load_for_prediction(checkpoint=None, pretrained=None, model_name=None, use_ema=False):
    """(model in eval mode, load: image path -> input tensor, class names) from a run or from pretrained
    weights. `load` raises DataError for a file that is not a readable image."""
    if (checkpoint is None) == (pretrained is None):
        raise ValueError("predict: give exactly one of checkpoint and pretrained")
    model, load, classes = (_from_checkpoint(checkpoint, use_ema) if checkpoint is not None
                            else _from_pretrained(pretrained, model_name))
    return model.eval(), load, classes


def predict(images: Sequence[str | Path], checkpoint=None, pretrained=None, model_name=None, topk: int = 5,
            use_ema: bool = False, batch_size: int = 16) -> list[dict]:
    """One entry per image, in the order given: {"image": path, "top": [{"label", "index", "prob"}, ...]}
    (best first), or {"image": path, "error": why} for a file that is not a readable image."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    model, load, classes = load_for_prediction(checkpoint, pretrained, model_name, use_ema)
    results: list[dict] = []
    for start in range(0, len(images), batch_size):
        chunk = [{"image": str(p)} for p in images[start:start + batch_size]]
        inputs = {}
        for i, entry in enumerate(chunk):
            try:
                inputs[i] = load(entry["image"])
            except DataError as e:
                entry["error"] = str(e)
        if inputs:
            with torch.no_grad():
                probs = torch.softmax(model(torch.stack(list(inputs.values()))).float(), dim=-1)
            top = probs.topk(min(topk, probs.shape[1]), dim=-1)
            for i, p, j in zip(inputs, top.values.tolist(), top.indices.tolist()):
                chunk[i]["top"] = [{"label": classes[c], "index": c, "prob": round(q, 6)} for q, c in zip(p, j)]
        results += chunk
    return results


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"])
        if "error" in r:
            lines.append(f"  not predicted: {r['error']}")
        else:
            lines += [f"  {t['prob']:.4f}  {t['label']}" for t in r["top"]]
    return "\n".join(lines)
