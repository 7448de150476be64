"""Using a trained point-cloud model on files: `predict` (class and probability per mesh / point file, or
per-point parts written as a coloured .ply), `render` (a cloud coloured by serialization order, predicted
parts or height), the renders `eval` writes, and rebuilding a model from a checkpoint without its data.

Inputs are read as the training data were made: a mesh is sampled to the recipe's n_points (area-uniform,
seeded), a point file is subsampled to them, and every cloud is centred and scaled into the unit sphere (as
ModelNet40, ScanObjectNN, ShapeNetPart and the CGAL sets are), so a scan in millimetres and one in metres get
the same answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mambakit.data.errors import DataError

from .config import PointCloudRecipe

__all__ = ["rebuild_model", "load_run", "read_input", "predict", "format_predictions", "render_file",
           "render_evaluated", "expand_inputs"]


# --------------------------------------------------------------------------------------------------
# a model from a checkpoint

def _output_width(weights: Mapping[str, torch.Tensor], source: str) -> int:
    """The width of the last layer: the class or part count (heads are registered last in every model)."""
    last = [w for k, w in weights.items() if k.endswith(".weight") and w.dim() >= 2]
    if not last:
        raise ValueError(f"{source}: no layer weights in the checkpoint")
    return int(last[-1].shape[0])


def rebuild_model(config: dict, weights: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """The network of a training checkpoint (fresh weights), from its saved recipe and the weight shapes."""
    from mambakit.engine.config import from_dict

    from .models import create_model

    recipe = from_dict(PointCloudRecipe, config, source)
    m, d = recipe.model, recipe.data
    if not d.class_names:
        raise ValueError(f"{source}: the saved recipe names no classes (data.class_names); was it trained by "
                         f"mambakit pointcloud?")
    n_out = _output_width(weights, source)
    if m.task == "seg":
        return create_model(m.name, n_out, in_channels=d.in_channels, task="seg", n_categories=len(d.class_names),
                            **m.kwargs)
    if n_out != len(d.class_names):
        raise ValueError(f"{source}: the model's last layer has {n_out} outputs for {len(d.class_names)} classes")
    return create_model(m.name, n_out, in_channels=d.in_channels, **m.kwargs)


def load_run(checkpoint: str | Path, use_ema: bool = False) -> tuple[nn.Module, PointCloudRecipe, dict]:
    """(model in eval mode, recipe, labels) of a run folder or checkpoint; labels as the run's labels.json
    (classes, or categories with their parts), from the recipe where the file is missing (classification)."""
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint, run_dir_of
    from mambakit.engine.config import from_dict
    from mambakit.engine.trainer import load_model_state

    from .task import LABELS_FILE

    path = resolve_checkpoint(checkpoint, prefer="best")
    state = load_checkpoint(path)
    key = "ema" if use_ema else "model"
    if state.get(key) is None:
        raise ValueError(f"{path}: holds no {'EMA ' if use_ema else ''}weights")
    config = state.get("config")
    if not isinstance(config, dict) or state.get("app") not in (None, "pointcloud"):
        raise ValueError(f"{path}: not a mambakit pointcloud checkpoint (app {state.get('app')!r})")
    recipe = from_dict(PointCloudRecipe, config, f"{path} (saved config)")
    model = rebuild_model(config, state[key], str(path))
    load_model_state(model, state[key], str(path))
    labels_file = run_dir_of(path) / LABELS_FILE
    if labels_file.is_file():
        labels = json.loads(labels_file.read_text())
    elif recipe.model.task == "cls":
        labels = {"task": "cls", "classes": list(recipe.data.class_names)}
    else:
        raise FileNotFoundError(f"{labels_file}: missing; a part-segmentation run needs it to name its parts")
    return model.eval(), recipe, labels


# --------------------------------------------------------------------------------------------------
# reading inputs

def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively) to their mesh and point files, sorted."""
    from .data import MESH_SUFFIXES, POINT_SUFFIXES

    suffixes = MESH_SUFFIXES + POINT_SUFFIXES
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise DataError(f"{p}: no mesh ({', '.join(MESH_SUFFIXES)}) or point ({', '.join(POINT_SUFFIXES)}) "
                                f"files in this folder")
            out += found
        else:
            out.append(p)
    return out


def read_input(path: str | Path, n_points: int, seed: int = 0):
    """A mesh or point file -> a Data cloud of n_points, centred and scaled into the unit sphere."""
    from .data import MESH_SUFFIXES, NormalizeUnitSphere, make_cloud, mesh_samples, read_point_file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in MESH_SUFFIXES:
        points, normals = mesh_samples(path, n_points, seed)
    else:
        points, normals = read_point_file(path)
        if len(points) < n_points:
            raise DataError(f"{path}: {len(points)} points, fewer than the {n_points} the model takes")
        pick = np.sort(np.random.default_rng(seed).choice(len(points), n_points, replace=False))
        points = points[pick]
        normals = normals[pick] if normals is not None else None
    cloud = make_cloud(points, x=normals, x_kind="normal" if normals is not None else None, name=str(path))
    return NormalizeUnitSphere()(cloud)


def _category_index(category: str | int | None, labels: dict) -> int:
    names = labels["categories"]
    if category is None:
        raise ValueError(f"part segmentation needs the shape category of the input: --category one of {names}")
    if str(category).isdigit() and int(category) < len(names):
        return int(category)
    if category not in names:
        raise ValueError(f"unknown category {category!r}; expected one of {names} (or an index)")
    return names.index(category)


# --------------------------------------------------------------------------------------------------
# predict

@torch.no_grad()
def _predict_cloud(model, recipe, labels, cloud, category: int | None) -> tuple[torch.Tensor, dict]:
    from .data import collate_points
    from .metrics import restricted_predictions

    if category is not None:
        cloud.category = torch.tensor([category])
    batch = collate_points([cloud], recipe.data.features)
    if labels["task"] == "seg":
        logits = model(batch["pos"], batch["x"], batch["category"])
        pred = restricted_predictions(logits, batch["category"], labels["parts_of_category"])[0]
        return pred, {}
    probs = torch.softmax(model(batch["pos"], batch["x"]).float(), dim=-1)[0]
    return probs, {}


def predict(inputs: Sequence[str | Path], checkpoint: str | Path, *, topk: int = 3, category: str | None = None,
            out_dir: str | Path | None = None, use_ema: bool = False) -> list[dict[str, Any]]:
    """One record per input file: classification {"file", "label", "probability", "topk"}; part segmentation
    {"file", "category", "parts" (points per part name), "ply" when out_dir is given}. A file that cannot be
    read gives {"file", "error"} and the rest still run."""
    from tqdm import tqdm

    from .plots import write_ply

    model, recipe, labels = load_run(checkpoint, use_ema)
    seg = labels["task"] == "seg"
    cat = _category_index(category, labels) if seg else None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    files = expand_inputs(inputs)
    results = []
    for path in tqdm(files, desc="predict", unit="file", disable=len(files) < 5):
        try:
            cloud = read_input(path, recipe.data.n_points)
            out, _ = _predict_cloud(model, recipe, labels, cloud, cat)
        except (DataError, OSError, ValueError) as e:
            message = str(e)
            results.append({"file": str(path), "error": message if str(path) in message else f"{path}: {message}"})
            continue
        if seg:
            names = labels["part_names"]
            counts = torch.bincount(out, minlength=len(names))
            record = {"file": str(path), "category": labels["categories"][cat],
                      "parts": {names[p]: int(counts[p]) for p in labels["parts_of_category"][cat]}}
            if out_dir is not None:
                ply = Path(out_dir) / f"{path.stem}.parts.ply"
                record["ply"] = str(write_ply(ply, cloud.pos, labels=out.numpy()))
        else:
            names = labels["classes"]
            top = torch.topk(out, min(topk, len(names)))
            record = {"file": str(path), "label": names[int(top.indices[0])], "probability": float(top.values[0]),
                      "topk": [[names[int(i)], float(v)] for v, i in zip(top.values, top.indices)]}
        results.append(record)
    return results


def format_predictions(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']}: could not be read")
        elif "label" in r:
            others = ", ".join(f"{n} {p:.3f}" for n, p in r["topk"][1:])
            lines.append(f"{r['file']}: {r['label']} ({r['probability']:.3f})" + (f"; then {others}" if others else ""))
        else:
            parts = ", ".join(f"{n} {c}" for n, c in r["parts"].items())
            lines.append(f"{r['file']} [{r['category']}]: points per part: {parts}"
                         + (f"; wrote {r['ply']}" if "ply" in r else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# render

def render_file(path: str | Path, out: str | Path, *, by: str = "order", orders: Sequence[str] = ("xyz", "hilbert", "z"),
                checkpoint: str | Path | None = None, category: str | None = None, n_points: int = 2048,
                grid_size: float = 0.02) -> Path:
    """A PNG of one mesh / point file: coloured by serialization order (one panel per order), by height, or
    by the parts a part-segmentation checkpoint predicts."""
    from .plots import render_cloud, render_orders

    name = Path(path).name
    if by == "prediction":
        if checkpoint is None:
            raise ValueError("render --by prediction needs --checkpoint of a part-segmentation run")
        model, recipe, labels = load_run(checkpoint)
        if labels["task"] != "seg":
            raise ValueError(f"{checkpoint}: a classification run; --by prediction colours parts, which needs a "
                             f"part-segmentation run (for a class, use `predict`)")
        cloud = read_input(path, recipe.data.n_points)
        cat = _category_index(category, labels)
        pred, _ = _predict_cloud(model, recipe, labels, cloud, cat)
        return render_cloud(cloud.pos, pred.numpy(), out, title=f"{name}: predicted parts ({labels['categories'][cat]})",
                            legend=labels["part_names"])
    cloud = read_input(path, n_points)
    if by == "height":
        return render_cloud(cloud.pos, cloud.pos[:, 1].numpy(), out, title=f"{name}: height")
    if by != "order":
        raise ValueError(f"render: --by must be order, prediction or height, got {by!r}")
    return render_orders(cloud.pos, [o.strip() for o in orders if o.strip()], out, title=f"{name}: scan orders",
                         grid_size=grid_size)


@torch.no_grad()
def render_evaluated(task, checkpoint: str | Path, split: str, out_dir: Path, use_ema: bool = False) -> list[Path]:
    """`eval`'s pictures: the first `eval.render_samples` clouds of the split, truth beside prediction, and the
    first cloud under `eval.render_orders`."""
    from .data import collate_points
    from .metrics import restricted_predictions
    from .plots import render_orders, render_panels

    cfg = task.config.eval
    dataset = getattr(task.splits, split)
    if dataset is None or (cfg.render_samples == 0 and not cfg.render_orders):
        return []
    model, recipe, labels = load_run(checkpoint, use_ema)
    written = []
    torch.manual_seed(0)
    for k in range(min(cfg.render_samples, len(dataset))):
        cloud = dataset[k]
        batch = collate_points([cloud], recipe.data.features)
        target = f"render_{split}_{k}.png"
        if labels["task"] == "seg":
            pred = restricted_predictions(model(batch["pos"], batch["x"], batch["category"]), batch["category"],
                                          labels["parts_of_category"])[0]
            panels = [{"colors": cloud.y.numpy(), "title": "truth"}, {"colors": pred.numpy(), "title": "predicted"}]
            written.append(render_panels(cloud.pos, panels, out_dir / target, title=Path(str(cloud.name)).name,
                                         legend=labels["part_names"]))
        else:
            probs = torch.softmax(model(batch["pos"], batch["x"]).float(), -1)[0]
            names = labels["classes"]
            truth, guess = names[int(cloud.y)], names[int(probs.argmax())]
            panels = [{"colors": None, "title": f"true {truth} / predicted {guess} ({float(probs.max()):.2f})"}]
            written.append(render_panels(cloud.pos, panels, out_dir / target, title=Path(str(cloud.name)).name))
    if cfg.render_orders and len(dataset):
        written.append(render_orders(dataset[0].pos, cfg.render_orders, out_dir / f"render_{split}_orders.png",
                                     title="scan orders of the first cloud"))
    return written
