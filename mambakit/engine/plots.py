"""Plots every app writes: training curves from the metric history (one panel per metric name;
train/val/val_ema/test of the same name share a panel; plus the learning rate, against optimiser steps) and
the confusion matrix of a classifier. Uses matplotlib's Agg canvas directly, so it never touches the global
backend of the calling program."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["plot_curves", "plot_confusion_matrix"]

_SKIP = {"step", "epoch", "wall_s", "weights_step"}


def _panels(history: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row in history:
        step = row.get("step")
        if step is None:
            continue
        for key, value in row.items():
            if key in _SKIP or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = key.split("/", 1)[1] if "/" in key else key
            if name.endswith("samples_per_s"):
                continue
            xs, ys = panels.setdefault(name, {}).setdefault(key, ([], []))
            xs.append(float(step))
            ys.append(float(value))
    return panels


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path | None:
    """Write the curves to `path` (PNG); returns None when the history has nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(history)
    if not panels:
        return None
    order = sorted(panels, key=lambda n: (n != "loss", n == "lr", n))
    columns = min(3, len(order))
    rows = -(-len(order) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for i, name in enumerate(order):
        axes = figure.add_subplot(rows, columns, i + 1)
        for key, (xs, ys) in sorted(panels[name].items()):
            style = "-" if len(xs) > 20 else "o-"
            axes.plot(xs, ys, style, label=key, markersize=3, linewidth=1.2)
        axes.set_title(name)
        axes.set_xlabel("optimiser step")
        axes.grid(alpha=0.3)
        if name == "lr":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        axes.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def plot_confusion_matrix(matrix: Any, class_names: Sequence[str], path: str | Path, title: str = "",
                          normalize: bool = True, max_labels: int = 40, max_count_labels: int = 20) -> Path:
    """Write the confusion matrix `matrix` (C, C) of counts (rows: true class, columns: predicted) to `path`
    (PNG / PDF / SVG by suffix). normalize: colours are row fractions (the recall of each true class). Cells
    show their counts when C <= max_count_labels; tick labels are dropped beyond `max_labels` classes
    (ImageNet's 1000 would be unreadable). The title carries the accuracy and the mean class accuracy."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if hasattr(matrix, "detach"):                 # a torch tensor, without importing torch here
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float64)
    C = len(class_names)
    if m.shape != (C, C):
        raise ValueError(f"plot_confusion_matrix: matrix has shape {m.shape}, expected ({C}, {C}) for "
                         f"{C} class names")
    rows = m.sum(axis=1, keepdims=True)
    shown = m / np.maximum(rows, 1) if normalize else m
    size = min(4 + 0.45 * C, 16)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class" if normalize else "count")
    font = 8 if C <= 20 else 6
    if C <= max_labels:
        axes.set_xticks(range(C), labels=list(class_names), rotation=90 if C > 8 else 0, fontsize=font)
        axes.set_yticks(range(C), labels=list(class_names), fontsize=font)
    if C <= max_count_labels:
        top = shown.max() or 1
        for i, j in zip(*np.nonzero(m)):
            axes.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=font - 1,
                      color="white" if shown[i, j] > 0.5 * top else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    present = rows[:, 0] > 0
    accuracy = np.trace(m) / max(m.sum(), 1)
    macc = (np.diag(m)[present] / rows[present, 0]).mean() if present.any() else float("nan")
    axes.set_title(f"{title}  (accuracy {accuracy:.4f}, mean class accuracy {macc:.4f}, n={int(m.sum())})".strip())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
