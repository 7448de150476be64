"""Synthetic whole-slide images for the pathology tests: pyramidal tiled TIFFs (what OpenSlide reads as
generic-tiff) with tissue disks at known places, written by the cohort's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

BACKGROUND = 242
TISSUE_RGB = (205, 120, 175)     # H&E-like pink: saturation ~ 105 / 255


def make_slide(path: Path, size=(1024, 768), disks=((512, 384, 250),), holes=(), mpp: float | None = 0.5,
               seed: int = 0, min_size: int = 128) -> Path:
    """A slide of `size` (w, h) with tissue disks (cx, cy, r) and background holes (cx, cy, r) inside them."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = np.zeros((h, w), dtype=bool)
    for cx, cy, r in disks:
        tissue |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    for cx, cy, r in holes:
        tissue &= (xx - cx) ** 2 + (yy - cy) ** 2 > r * r
    image = np.full((h, w, 3), BACKGROUND, dtype=np.int16)
    image[tissue] = TISSUE_RGB
    image += rng.integers(-6, 7, size=image.shape, dtype=np.int16)
    from mambakit.apps.pathology.cohort import write_pyramid

    write_pyramid(path, np.clip(image, 0, 255).astype(np.uint8), mpp, tile=128, min_size=min_size)
    return path


@pytest.fixture
def slide_factory(tmp_path):
    def factory(name: str = "slide_a", folder: Path | None = None, **kwargs) -> Path:
        folder = folder or tmp_path / "slides"
        folder.mkdir(parents=True, exist_ok=True)
        return make_slide(folder / f"{name}.tif", **kwargs)
    return factory


@pytest.fixture
def small_tile_params():
    """Tiling for small synthetic slides: 128-pixel patches at level 0, CLAM's segmentation with small areas."""
    from mambakit.apps.pathology.wsi import SegmentationParams, TileParams

    return TileParams(patch_size=128, seg=SegmentationParams(a_t=0.05, a_h=0.05, ref_patch_size=512), thumbnail_size=256)
