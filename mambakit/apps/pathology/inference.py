"""From a trained checkpoint to per-patch scores and heatmaps: the model of a run, its bag scores (the
same forward the evaluation loop runs), and attention drawn over the slides.

Used by `task.py` (heatmaps at the end of training), `pipeline.py` (the cohort report) and the `heatmap`
verb; it imports neither of the first two, so the app's modules import one way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mambakit.engine.checkpoint import run_dir_of as checkpoint_run_dir

from .data import Bag, load_features, strip_slide_suffix
from .wsi import SLIDE_EXTENSIONS, open_slide, slide_thumbnail

__all__ = ["rebuild_mil_model", "model_from_checkpoint", "run_dir_of", "training_features_meta", "bag_scores", "heatmap_for_bag", "heatmap_for_slide",
           "find_slide"]



def _n_outputs(state: dict) -> int:
    for key in ("classifier.weight", "classifier.0.weight"):
        if key in state:
            return int(state[key].shape[0])
    heads = sorted((int(k.split(".")[1]), k) for k in state if k.startswith("head.") and k.endswith(".weight"))
    if heads:
        return int(state[heads[-1][1]].shape[0])
    raise ValueError("cannot find the classifier in the checkpoint (classifier.weight / head.N.weight)")


def rebuild_mil_model(config: dict, weights, source: str):
    """The MIL model of a training checkpoint's saved recipe, with fresh weights, without the features or the
    label CSV: the number of outputs (classes, or survival bins) is the row count of the classifier's weight.
    (The app's `rebuild_model` hook, behind `zoo.load_pretrained("runs/<x>")`, and `model_from_checkpoint`.)"""
    from mambakit.engine.config import from_dict

    from .config import MILRecipe
    from .models import build_mil_model

    recipe = from_dict(MILRecipe, config, source)
    params = dict(vars(recipe.model))
    name, in_dim = params.pop("name"), params.pop("in_dim")
    try:
        n_outputs = _n_outputs(weights)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return build_mil_model(name, in_dim, n_outputs, **params)


def model_from_checkpoint(checkpoint: str | Path, use_ema: bool = False):
    """(model in eval mode, recipe, class names) from a training checkpoint or run folder."""
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint
    from mambakit.engine.config import from_dict
    from mambakit.engine.trainer import load_model_state

    from .config import MILRecipe

    path = resolve_checkpoint(checkpoint, prefer="best")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{path} holds no saved recipe; it is not a mambakit pathology checkpoint")
    source = f"{path} (saved config)"
    recipe = from_dict(MILRecipe, state["config"], source)
    weights = state["ema" if use_ema else "model"]
    if weights is None:
        raise ValueError(f"{path} has no {'EMA ' if use_ema else ''}weights")
    model = rebuild_mil_model(state["config"], weights, source)
    load_model_state(model, weights, str(path))
    classes_file = checkpoint_run_dir(path) / "classes.json"
    classes = json.loads(classes_file.read_text())["classes"] if classes_file.is_file() else None
    return model.eval(), recipe, classes


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint file or run folder."""
    from mambakit.engine.checkpoint import resolve_checkpoint

    return checkpoint_run_dir(resolve_checkpoint(checkpoint, prefer="best"))


def training_features_meta(checkpoint: str | Path, recipe) -> tuple[dict | None, list[Path]]:
    """(features_meta.json of the features the run was trained on, the places looked at): the copy in the
    run folder (written at the end of training), else the one in the recipe's data.features folder."""
    places = [run_dir_of(checkpoint) / "features_meta.json"]
    if recipe.data.features:
        places.append(Path(recipe.data.features) / "features_meta.json")
    for place in places:
        if place.is_file():
            return json.loads(place.read_text()), places
    return None, places


@torch.no_grad()
def bag_scores(model, features: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(logits (1, C), per-instance scores (N,))."""
    logits, scores = model(features, return_scores=True)
    return logits, scores[0].detach().cpu().numpy()


def find_slide(slides_dir: str | Path, slide_id: str) -> Path:
    folder = Path(slides_dir)
    for ext in SLIDE_EXTENSIONS:
        for candidate in (folder / f"{slide_id}{ext}", folder / f"{slide_id}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no slide file for {slide_id!r} in {folder} (looked for {', '.join(SLIDE_EXTENSIONS)})")


def _patch_size_level0(h5: Path) -> int:
    from .wsi import geometry_from_attrs, read_coords_h5

    _, attrs = read_coords_h5(h5)
    return geometry_from_attrs(attrs).size_level0


def _h5_for(path: Path) -> Path:
    return path if path.suffix == ".h5" else path.parent.parent / "h5_files" / f"{path.stem}.h5"


def _title(logits: torch.Tensor, classes, survival: bool) -> str:
    if survival:
        from .losses import hazards_and_survival

        _, s = hazards_and_survival(logits.float())
        return f"risk (-sum S) = {float(-s.sum()):.3f}"
    probs = torch.softmax(logits.float(), dim=1)[0]
    top = int(probs.argmax())
    name = classes[top] if classes and top < len(classes) else f"class {top}"
    return f"predicted {name} (p = {float(probs[top]):.3f})"


def heatmap_for_bag(model, bag: Bag, slides_dir: str | Path, out: str | Path, classes=None, survival: bool = False,
                    normalize: str = "percentile", max_size: int = 1024, regions: dict | None = None) -> list[Path]:
    """Draw the bag's per-patch scores over each of its slides. A bag of several slides gets one PNG per
    slide (`<out stem>_<slide_id>.png`). `regions`: slide id -> level-0 boxes to outline."""
    parts = [load_features(_h5_for(p), with_coords=True) for p in bag.paths]
    feats = torch.cat([f for f, _ in parts])
    logits, scores = bag_scores(model, feats)
    title = _title(logits, classes, survival)
    out = Path(out)
    written, start = [], 0
    for sid, path, (f, coords) in zip(bag.slide_ids, bag.paths, parts):
        n = len(f)
        target = out if len(bag.slide_ids) == 1 else out.with_name(f"{out.stem}_{strip_slide_suffix(sid)}.png")
        written.append(heatmap_for_slide(find_slide(slides_dir, strip_slide_suffix(sid)), scores[start:start + n],
                                         coords, _patch_size_level0(_h5_for(path)), target, title=f"{sid}: {title}",
                                         normalize=normalize, max_size=max_size,
                                         regions=(regions or {}).get(strip_slide_suffix(sid), ())))
        start += n
    return written


def heatmap_for_slide(slide_path: str | Path, scores: np.ndarray, coords: np.ndarray, size_level0: int,
                      out: str | Path, title: str = "", normalize: str = "percentile", max_size: int = 1024,
                      regions: Sequence = ()) -> Path:
    from .plots import draw_heatmap, save_heatmap

    slide = open_slide(slide_path)
    try:
        thumbnail, scale = slide_thumbnail(slide, max_size)
    finally:
        slide.close()
    image = draw_heatmap(thumbnail, scale, scores, coords, size_level0, normalize=normalize,
                         regions=[r["box"] if isinstance(r, dict) else r for r in regions])
    return save_heatmap(image, out, title=title, normalize=normalize)
