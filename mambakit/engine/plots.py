"""Training curves from the metric history: one panel per metric name (train/val/val_ema/test of the same
name share a panel), plus the learning rate, against optimiser steps. Uses matplotlib's Agg canvas
directly, so it never touches the global backend of the calling program."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_curves"]

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
