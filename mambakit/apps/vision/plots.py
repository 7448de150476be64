"""Classification plots: the confusion matrix (rows: true class, columns: predicted class).

Drawn on matplotlib's Agg canvas directly, so the calling program's backend is never touched."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_confusion_matrix"]


def plot_confusion_matrix(matrix, class_names: Sequence[str], path: str | Path, title: str = "",
                          normalize: bool = True, max_labels: int = 40) -> Path:
    """Write `matrix` (C, C) of counts to `path` (PNG/PDF/SVG by suffix). normalize: colours are row
    fractions (recall per true class); cells show counts when C <= 20. Tick labels are dropped beyond
    `max_labels` classes (ImageNet's 1000 would be unreadable)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.float64)
    C = len(class_names)
    if m.shape != (C, C):
        raise ValueError(f"plot_confusion_matrix: matrix has shape {m.shape}, expected ({C}, {C}) for "
                         f"{C} class names")
    shown = m / np.maximum(m.sum(axis=1, keepdims=True), 1) if normalize else m
    size = min(4 + 0.45 * C, 16)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="fraction of the true class" if normalize else "count")
    if C <= max_labels:
        axes.set_xticks(range(C), labels=list(class_names), rotation=90 if C > 10 else 0, fontsize=8)
        axes.set_yticks(range(C), labels=list(class_names), fontsize=8)
    if C <= 20:
        for i in range(C):
            for j in range(C):
                if m[i, j]:
                    axes.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                              color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = np.trace(m) / max(m.sum(), 1)
    axes.set_title(f"{title}  (accuracy {accuracy:.4f}, n={int(m.sum())})".strip())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
