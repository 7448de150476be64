"""Pictures a pathologist looks at: the QC thumbnail with the patch grid, and attention heatmaps drawn over
the slide thumbnail (per-patch scores mapped back to their level-0 coordinates, as CLAM's heatmaps).

Drawing only: every function takes the thumbnail (a PIL image, `wsi.slide_thumbnail`) and its scale
(thumbnail pixels per level-0 pixel, x and y); reading slides is `wsi.py`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["draw_patch_grid", "score_canvas", "normalize_scores", "draw_heatmap", "save_heatmap"]


def draw_patch_grid(thumbnail, scale: tuple[float, float], coords: np.ndarray, size_level0: int, tissue=None):
    """QC thumbnail: the slide, tissue outlines (green), kept holes (blue) and every patch (black box)."""
    from PIL import Image, ImageDraw

    image, (fx, fy) = thumbnail.copy(), scale
    if tissue is not None:
        overlay = np.asarray(image).copy()
        for mask, colour in ((tissue.labels > 0, (0, 170, 0)), (tissue.holes, (0, 0, 255))):
            edge = _outline(mask)
            if edge.any():
                small = Image.fromarray(edge.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
                overlay[np.asarray(small) > 0] = colour
        image = Image.fromarray(overlay)
    draw = ImageDraw.Draw(image)
    for x, y in np.asarray(coords):
        draw.rectangle([x * fx, y * fy, (x + size_level0) * fx, (y + size_level0) * fy], outline=(0, 0, 0))
    return image


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)


def normalize_scores(scores: np.ndarray, mode: str = "percentile") -> np.ndarray:
    """Scores to [0, 1]: 'percentile' (rank / n, CLAM's default), 'minmax', or 'none' (clipped)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        return scores
    if mode == "percentile":
        from scipy.stats import rankdata

        return (rankdata(scores, method="average") - 1) / max(len(scores) - 1, 1)
    if mode == "minmax":
        lo, hi = scores.min(), scores.max()
        return np.zeros_like(scores) if hi == lo else (scores - lo) / (hi - lo)
    if mode == "none":
        return np.clip(scores, 0.0, 1.0)
    raise ValueError(f"normalize must be 'percentile', 'minmax' or 'none', got {mode!r}")


def score_canvas(scores: np.ndarray, coords: np.ndarray, size_level0: int, shape: tuple[int, int],
                 scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Average the per-patch `scores` over a canvas of `shape` (h, w) whose pixel is `1/scale` level-0 pixels.
    Returns (canvas, covered) where covered marks pixels under at least one patch (overlaps average)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    coords = np.asarray(coords)
    if len(scores) != len(coords):
        raise ValueError(f"{len(scores)} scores for {len(coords)} coordinates; they must match one to one")
    h, w = shape
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    fx, fy = scale
    for (x, y), s in zip(coords, scores):
        x0, y0 = int(np.floor(x * fx)), int(np.floor(y * fy))
        x1, y1 = int(np.ceil((x + size_level0) * fx)), int(np.ceil((y + size_level0) * fy))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 > x0 and y1 > y0:
            total[y0:y1, x0:x1] += s
            count[y0:y1, x0:x1] += 1
    covered = count > 0
    canvas = np.zeros((h, w))
    canvas[covered] = total[covered] / count[covered]
    return canvas, covered


def draw_heatmap(thumbnail, scale: tuple[float, float], scores: np.ndarray, coords: np.ndarray, size_level0: int,
                 normalize: str = "percentile", alpha: float = 0.5, cmap: str = "jet",
                 regions: Sequence[Sequence[int]] = ()):
    """The slide thumbnail with per-patch scores blended in (RGB PIL image). `regions`: level-0 boxes
    (x, y, w, h) outlined in white (e.g. planted or annotated tumour)."""
    import matplotlib
    from PIL import Image, ImageDraw

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = thumbnail.convert("RGB")
    values = normalize_scores(scores, normalize)
    canvas, covered = score_canvas(values, coords, size_level0, (image.height, image.width), scale)
    colours = (matplotlib.colormaps[cmap](canvas)[..., :3] * 255).astype(np.float64)
    base = np.asarray(image).astype(np.float64)
    out = base.copy()
    out[covered] = (1 - alpha) * base[covered] + alpha * colours[covered]
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if regions:
        draw = ImageDraw.Draw(result)
        for x, y, w, h in regions:
            draw.rectangle([x * scale[0], y * scale[1], (x + w) * scale[0], (y + h) * scale[1]],
                           outline=(255, 255, 255), width=2)
    return result


def save_heatmap(image, path: str | Path, title: str = "", cmap: str = "jet", normalize: str = "percentile") -> Path:
    """Save the heatmap with a colour bar and a title (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = image.size
    fig, ax = plt.subplots(figsize=(max(4.0, w / 150) + 1.0, max(4.0, h / 150)), dpi=150)
    ax.imshow(np.asarray(image))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    mappable = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, 1))
    label = {"percentile": "attention (percentile)", "minmax": "attention (min-max scaled)"}.get(normalize, "score")
    fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02, label=label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
