"""Pictures and files people look at: the confusion matrix, 3-D renders of clouds (by label, by prediction, by
the position of each point in a serialization order), and PLY files for MeshLab / CloudCompare / Open3D.

Figures are drawn on matplotlib's Agg canvas directly (imported when a plot is made), so the calling program's
backend is never touched and `import` stays cheap. Inputs may be numpy arrays or torch tensors.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mambakit.engine.plots import plot_confusion_matrix     # shared with the vision app

__all__ = ["label_palette", "point_colors", "order_ranks", "scan_path", "plot_confusion_matrix", "render_cloud",
           "render_panels", "render_orders", "write_ply"]

PATH_STEPS = 200          # how much of a scan order's path is drawn: enough to see its shape, not a scribble


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):                  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _positions(pos: Any, what: str = "pos") -> np.ndarray:
    pos = _numpy(pos)
    if pos.ndim != 2 or pos.shape[1] != 3 or not len(pos):
        raise ValueError(f"{what} must be a non-empty (N, 3) array of xyz positions, got shape {pos.shape}")
    if not np.issubdtype(pos.dtype, np.number) or not np.isfinite(pos).all():
        raise ValueError(f"{what} must hold finite numbers (found NaN / inf or a non-numeric dtype {pos.dtype})")
    return pos.astype(np.float64)


# --------------------------------------------------------------------------------------------------
# colours

@lru_cache(maxsize=8)
def _palette(n: int) -> np.ndarray:
    # Greedy max-min colours on a 16-level RGB grid, skipping the darkest and lightest (they vanish against
    # the points' outlines and the white background): 50 colours stay at least 70 RGB units apart.
    levels = np.arange(0, 256, 17, dtype=np.float64)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    luminance = grid @ np.array([0.299, 0.587, 0.114])
    grid = grid[(luminance > 40) & (luminance < 215)]
    chosen = [np.array([31.0, 119.0, 180.0])]          # matplotlib's first colour starts the palette
    distance = np.linalg.norm(grid - chosen[0], axis=1)
    while len(chosen) < n:
        pick = grid[distance.argmax()]
        chosen.append(pick)
        distance = np.minimum(distance, np.linalg.norm(grid - pick, axis=1))
    return np.array(chosen[:n]).round().astype(np.uint8)


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct RGB colours for n labels (ShapeNetPart's 50 parts are >= 70 RGB units apart).
    Deterministic: label i always gets the same colour."""
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= 1000:
        raise ValueError(f"label_palette: n must be an int in [1, 1000], got {n!r}")
    return _palette(int(n)).copy()


def point_colors(values: Any, n_points: int, cmap: str = "viridis") -> np.ndarray:
    """(N, 4) float RGBA for a cloud of `n_points` from one of:
    - integer labels (N,): the label palette (label i -> label_palette colour i);
    - float values (N,): `cmap` over [min, max] (e.g. a point's rank in a scan order);
    - RGB (N, 3) or RGBA (N, 4): uint8 0-255 or floats in [0, 1];
    - None: `cmap` over the height (y, the gravity axis of ModelNet / ScanObjectNN / ShapeNetPart)."""
    from matplotlib import colormaps

    if values is None:
        raise ValueError("point_colors: values is None; pass the heights or labels to colour by")
    values = _numpy(values)
    if values.shape[:1] != (n_points,):
        raise ValueError(f"point_colors: expected {n_points} values (one per point), got shape {values.shape}")
    if values.ndim == 2 and values.shape[1] in (3, 4):
        rgba = _rgb_as_float(values, "colors")
        return rgba if rgba.shape[1] == 4 else np.concatenate([rgba, np.ones((n_points, 1))], axis=1)
    if values.ndim != 1:
        raise ValueError(f"point_colors: expected labels or values (N,) or colours (N, 3|4), got shape "
                         f"{values.shape}")
    if np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
        labels = values.astype(np.int64)
        if labels.min() < 0:
            raise ValueError(f"point_colors: labels must be >= 0, got {labels.min()}")
        rgb = label_palette(int(labels.max()) + 1)[labels] / 255.0
        return np.concatenate([rgb, np.ones((n_points, 1))], axis=1)
    values = values.astype(np.float64)
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    return colormaps[cmap](scaled)


def _rgb_as_float(colors: np.ndarray, what: str) -> np.ndarray:
    if np.issubdtype(colors.dtype, np.integer):
        if colors.min() < 0 or colors.max() > 255:
            raise ValueError(f"{what}: integer colours must lie in 0..255, got [{colors.min()}, {colors.max()}]")
        return colors.astype(np.float64) / 255.0
    colors = colors.astype(np.float64)
    if not np.isfinite(colors).all() or colors.min() < 0 or colors.max() > 1:
        raise ValueError(f"{what}: float colours must lie in [0, 1] (uint8 for 0..255), got "
                         f"[{np.nanmin(colors)}, {np.nanmax(colors)}]")
    return colors


# --------------------------------------------------------------------------------------------------
# scan orders

def order_ranks(pos: Any, order: str, grid_size: float = 0.02, snake: str = "paper") -> np.ndarray:
    """(N,) int64: each point's position in the sequence that serialization `order` (hilbert, z, z_trans,
    hilbert_trans, xyz ... zyx) makes of the cloud: the inverse of the order's permutation, as PCM's layers
    see it (mambakit.core.orders.PointOrder with the same grid_size; 0.02 suits clouds in the unit sphere)."""
    import torch

    from mambakit.core.orders import PointOrder

    pos = _positions(pos)
    coords = torch.as_tensor(pos, dtype=torch.float64)[None]
    indices = PointOrder(order, grid_size=grid_size, snake=snake).indices(len(pos), coords=coords)
    return indices.inverse[0].cpu().numpy().astype(np.int64)


def scan_path(pos: Any, ranks: Any, steps: int = PATH_STEPS) -> np.ndarray:
    """(min(steps, N), 3): the positions of the first `steps` points of the sequence given by `ranks`."""
    pos, ranks = _positions(pos), _numpy(ranks)
    if ranks.shape != (len(pos),) or not np.array_equal(np.sort(ranks), np.arange(len(pos))):
        raise ValueError(f"scan_path: ranks must be a permutation of 0..{len(pos) - 1} (one rank per point), "
                         f"got shape {ranks.shape}")
    return pos[np.argsort(ranks)[:steps]]


# --------------------------------------------------------------------------------------------------
# figures

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def _draw_cloud(axes, pos: np.ndarray, colors: np.ndarray, title: str, line: np.ndarray | None,
                point_size: float, view: tuple[float, float]) -> None:
    axes.scatter(pos[:, 0], pos[:, 2], pos[:, 1], c=colors, s=point_size, depthshade=False, linewidths=0)
    if line is not None and len(line) > 1:
        axes.plot(line[:, 0], line[:, 2], line[:, 1], color="black", linewidth=0.8, alpha=0.8)
        axes.scatter(*line[0, [0, 2, 1]], color="red", s=25, depthshade=False, label="start")
    # y is up in ModelNet / ScanObjectNN / ShapeNetPart: plot (x, z, y) so the object stands upright.
    axes.set_xlabel("x")
    axes.set_ylabel("z")
    axes.set_zlabel("y")
    low, high = pos.min(0), pos.max(0)
    centre, half = (low + high) / 2, max((high - low).max() / 2, 1e-9)
    axes.set_xlim(centre[0] - half, centre[0] + half)
    axes.set_ylim(centre[2] - half, centre[2] + half)
    axes.set_zlim(centre[1] - half, centre[1] + half)
    axes.set_box_aspect((1, 1, 1))
    axes.view_init(elev=view[0], azim=view[1])
    axes.tick_params(labelsize=6)
    axes.set_title(title, fontsize=9)


def render_panels(pos: Any, panels: Sequence[dict], path: str | Path, title: str = "", columns: int | None = None,
                  point_size: float = 4.0, view: tuple[float, float] = (20.0, -60.0), cmap: str = "viridis",
                  legend: Sequence[str] | None = None) -> Path:
    """Several views of one cloud side by side, one per panel: each a dict with `colors` (anything
    `point_colors` takes, or None for height), optional `title`, optional `ranks` (N,) whose first
    PATH_STEPS points are drawn as a line from a red start dot). legend: label names shown under the figure
    for integer-label panels (at most 20)."""
    pos = _positions(pos)
    if not panels:
        raise ValueError("render_panels: no panels to draw")
    columns = columns or min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure = _figure(3.6 * columns, 3.6 * rows + (0.5 if legend else 0) + (0.3 if title else 0))
    for i, panel in enumerate(panels):
        unknown = set(panel) - {"colors", "title", "ranks"}
        if unknown:
            raise ValueError(f"render_panels: panel {i} has unknown keys {sorted(unknown)}; expected colors, "
                             f"title, ranks")
        values = panel.get("colors")
        colors = point_colors(pos[:, 1] if values is None else values, len(pos), cmap)
        ranks = panel.get("ranks")
        line = scan_path(pos, ranks) if ranks is not None else None
        axes = figure.add_subplot(rows, columns, i + 1, projection="3d")
        _draw_cloud(axes, pos, colors, panel.get("title", ""), line, point_size, view)
    if legend:
        _legend(figure, legend)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _legend(figure, names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    names = list(names)[:20]
    colors = label_palette(len(names)) / 255.0
    figure.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, names)], loc="outside lower center",
                  ncols=min(len(names), 6), fontsize=7, frameon=False)


def render_cloud(pos: Any, colors_or_labels: Any, path: str | Path, title: str = "", *, ranks: Any = None,
                 point_size: float = 4.0, view: tuple[float, float] = (20.0, -60.0), cmap: str = "viridis",
                 legend: Sequence[str] | None = None) -> Path:
    """A 3-D scatter PNG of one cloud. colors_or_labels: integer labels (N,) (parts, classes, predictions;
    coloured by `label_palette`), float values (N,) through `cmap`, RGB (N, 3), or None (height).
    ranks: a scan order's ranks (`order_ranks`); the first PATH_STEPS points of that order are drawn as a line.
    legend: the label names, for label colouring."""
    return render_panels(pos, [{"colors": colors_or_labels, "title": "", "ranks": ranks}], path, title,
                         point_size=point_size, view=view, cmap=cmap, legend=legend)


def render_orders(pos: Any, orders: Sequence[str], path: str | Path, title: str = "", grid_size: float = 0.02,
                  snake: str = "paper", **kwargs) -> Path:
    """The same cloud under each serialization order of `orders` (3-6 reads well), side by side: points
    coloured by their rank in the order (dark = early, `cmap` viridis), the first PATH_STEPS steps drawn."""
    if not orders:
        raise ValueError("render_orders: give at least one order name")
    pos = _positions(pos)
    panels = []
    for name in orders:
        ranks = order_ranks(pos, name, grid_size, snake)
        panels.append({"colors": ranks.astype(np.float64), "title": f"{name} order", "ranks": ranks})
    return render_panels(pos, panels, path, title, **kwargs)


# --------------------------------------------------------------------------------------------------
# PLY

def write_ply(path: str | Path, pos: Any, colors: Any = None, labels: Any = None, binary: bool = True) -> Path:
    """Write a point cloud as PLY: vertex x y z (float), red green blue (uchar), and `label` (int) when labels
    are given. binary: little-endian binary (compact), else ASCII. colors: (N, 3) uint8 or floats in [0, 1];
    when left out the points take the label palette colours, or grey without labels."""
    pos = _positions(pos).astype(np.float32)
    n = len(pos)
    if labels is not None:
        labels = _numpy(labels)
        if labels.shape != (n,) or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise ValueError(f"write_ply: labels must be (N,) = ({n},) integers, got shape {labels.shape} "
                             f"dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        if labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max:
            raise ValueError("write_ply: labels must fit in int32")
    if colors is not None:
        colors = _numpy(colors)
        if colors.shape != (n, 3):
            raise ValueError(f"write_ply: colors must be (N, 3) = ({n}, 3) RGB, got shape {colors.shape}")
        rgb = (_rgb_as_float(colors, "write_ply colors") * 255).round().astype(np.uint8)
    elif labels is not None and labels.min() >= 0:
        rgb = label_palette(int(labels.max()) + 1)[labels]
    else:
        rgb = np.full((n, 3), 200, dtype=np.uint8)

    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if labels is not None:
        fields.append(("label", "<i4"))
    vertices = np.empty(n, dtype=fields)
    vertices["x"], vertices["y"], vertices["z"] = pos.T
    vertices["red"], vertices["green"], vertices["blue"] = rgb.T
    if labels is not None:
        vertices["label"] = labels

    ply_types = {"<f4": "float", "u1": "uchar", "<i4": "int"}
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", "comment written by mambakit",
              f"element vertex {n}", *(f"property {ply_types[t]} {name}" for name, t in fields), "end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            f.write(vertices.tobytes())
        else:
            formats = ["%.9g"] * 3 + ["%d"] * (len(fields) - 3)     # 9 digits: float32 round-trips exactly
            np.savetxt(f, np.column_stack([vertices[name].astype(np.float64) for name, _ in fields]),
                       fmt=formats)
    tmp.replace(path)              # a crash mid-write never leaves a truncated file under the final name
    return path
