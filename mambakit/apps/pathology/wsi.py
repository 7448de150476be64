"""Whole-slide images to patch coordinates: open, segment tissue, lay a patch grid, save CLAM's HDF5.

What a CLAM user knows, done without OpenCV:

- Tissue segmentation (CLAM `WholeSlideImage.segmentTissue`): HSV saturation of a low-resolution image,
  median blur (`mthresh`), binary threshold (`sthresh`, or Otsu), morphological closing (`close`), then
  connected tissue regions kept when their area (holes removed) exceeds `a_t` reference patches, and up to
  `max_n_holes` holes per region kept when larger than `a_h` reference patches. The reference patch is
  `ref_patch_size`^2 level-0 pixels (CLAM: 512^2). Defaults are CLAM's `create_patches_fp.py` defaults.
- Patch grid (CLAM `process_contour`): for each tissue region, a grid over its bounding box starting at the
  box's corner, kept by CLAM's "four_pt" test (one of four points half-way between the patch centre and its
  corners lies in the region) and dropped when the centre lies in a hole.
- Resolution: a magnification (20x means 0.5 um/px) or an mpp. The needed factor is target_mpp / slide_mpp
  (snapped to the nearest integer when within `mpp_tolerance`, since scanners report 0.2520 for a nominal
  0.25); the best pyramid level is the one whose downsample is closest below that factor, and the patch is
  read there at `read_size = patch_size * factor / downsample` pixels and resized to `patch_size`.
- HDF5 (CLAM layout): dataset `coords` (N, 2) int64, level-0 top-left (x, y), with attributes `patch_size`
  (pixels read at `patch_level`, as CLAM), `patch_level`, `downsample`, `downsampled_level_dim`,
  `level_dim`, `name`, `save_path`; mambakit adds `target_patch_size` (pixels after resizing),
  `patch_size_level0`, `mpp`, `target_mpp`.

Every failure on one slide raises `SlideError` with a `kind` (unreadable, no_mpp, no_tissue, resolution,
bad_coords); `tile_slides` collects them and goes on.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "SLIDE_EXTENSIONS", "SlideError", "SegmentationParams", "TileParams", "PatchGeometry", "TissueMask",
    "TileResult", "list_slides", "slide_id_of", "open_slide", "slide_mpp", "patch_geometry", "choose_level",
    "segment_tissue", "patch_grid", "save_coords_h5", "read_coords_h5", "tile_slide", "tile_slides",
    "read_patch", "write_summary",
]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif",
                    ".dcm")


class SlideError(Exception):
    """One slide could not be processed. `kind` is a short machine-readable reason."""

    def __init__(self, slide: str, kind: str, message: str):
        super().__init__(f"{slide}: {message}")
        self.slide = slide
        self.kind = kind
        self.message = message


@dataclass
class SegmentationParams:
    """CLAM's tissue segmentation parameters (create_patches_fp.py defaults). Messages name each field by
    its command-line option (`a_t` is `--a-t`, `sthresh` is `--sthresh`, ...), the one name users see."""
    seg_level: int = -1            # -1: the level closest to a 64x downsample (CLAM)
    max_seg_size: int = 2048       # larger segmentation images are read as a thumbnail of this size
    sthresh: int = 8               # saturation threshold (0-255) when not use_otsu
    sthresh_up: int = 255
    mthresh: int = 7               # median blur kernel (odd)
    close: int = 4                 # closing kernel size; 0 turns it off
    use_otsu: bool = False
    a_t: float = 100.0             # min tissue area, in reference patches
    a_h: float = 16.0              # min hole area, in reference patches
    max_n_holes: int = 8
    ref_patch_size: int = 512      # the reference patch side in level-0 pixels

    def __post_init__(self):
        if self.mthresh < 1 or self.mthresh % 2 == 0:
            raise ValueError(f"--mthresh must be a positive odd kernel size, got {self.mthresh}")
        if self.close < 0:
            raise ValueError(f"--close must be >= 0, got {self.close}")
        if not 0 <= self.sthresh <= 255:
            raise ValueError(f"--sthresh must be in 0..255, got {self.sthresh}")


@dataclass
class TileParams:
    """Where and how big the patches are. Give at most one of magnification, mpp and level."""
    patch_size: int = 256                  # output pixels (after resizing)
    step_size: int | None = None           # output pixels between patches; default patch_size (no overlap)
    magnification: float | None = None     # e.g. 20 (= 0.5 um/px)
    mpp: float | None = None               # microns per pixel, e.g. 0.5
    level: int | None = None               # a pyramid level read as it is (CLAM's --patch_level)
    mpp_tolerance: float = 0.03            # relative; snaps 1.98 to 2 and 0.998 to 1
    contour_fn: str = "four_pt"            # four_pt | four_pt_hard | center | basic (CLAM's tests)
    seg: SegmentationParams = field(default_factory=SegmentationParams)
    thumbnail_size: int = 1024             # QC thumbnail's longest side (0: none)

    def __post_init__(self):
        given = [n for n in ("magnification", "mpp", "level") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of magnification, mpp and level; got {', '.join(given)}")
        if self.patch_size < 8:
            raise ValueError(f"patch_size must be >= 8 pixels, got {self.patch_size}")
        if self.step_size is not None and self.step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size}")
        for name in ("magnification", "mpp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.level is not None and self.level < 0:
            raise ValueError(f"level must be >= 0, got {self.level}")
        if self.contour_fn not in ("four_pt", "four_pt_hard", "center", "basic"):
            raise ValueError(f"contour_fn must be four_pt, four_pt_hard, center or basic, got {self.contour_fn!r}")

    @property
    def target_mpp(self) -> float | None:
        if self.mpp is not None:
            return float(self.mpp)
        if self.magnification is not None:
            return 10.0 / float(self.magnification)     # 20x = 0.5 um/px, 40x = 0.25 um/px
        return None


@dataclass
class PatchGeometry:
    """How a patch of `patch_size` output pixels is read from a slide."""
    level: int                 # pyramid level read
    downsample: float          # that level's downsample
    read_size: int             # pixels read at `level` (CLAM's `patch_size` attribute)
    patch_size: int            # pixels after resizing
    size_level0: int           # the patch's side in level-0 pixels
    step_level0: int           # grid step in level-0 pixels
    slide_mpp: float | None
    target_mpp: float | None


@dataclass
class TissueMask:
    """Tissue regions on a low-resolution image. `labels`: 0 background, k > 0 region k (holes filled in);
    `holes`: kept holes (bool); `scale`: level-0 pixels per mask pixel (x, y)."""
    labels: np.ndarray
    holes: np.ndarray
    scale: tuple[float, float]
    n_regions: int
    image: np.ndarray | None = None   # the RGB image segmented (for QC)
    largest_region: float = 0.0       # area of the largest candidate region, in reference patches


@dataclass
class TileResult:
    slide_id: str
    path: str
    status: str                  # ok | skipped | failed
    n_patches: int = 0
    h5: str = ""
    thumbnail: str = ""
    error_kind: str = ""
    error: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# slides

def slide_id_of(path: str | os.PathLike) -> str:
    """CLAM's slide id: the file name without its last extension."""
    return Path(path).stem


def list_slides(folder: str | os.PathLike, extensions: Sequence[str] = SLIDE_EXTENSIONS) -> list[Path]:
    """Slide files in `folder` (not recursive), sorted by name. Raises if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"slides folder {folder} does not exist")
    exts = tuple(e.lower() for e in extensions)
    slides = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not slides:
        raise FileNotFoundError(f"no slides in {folder} (looked for {', '.join(exts)})")
    ids = [slide_id_of(p) for p in slides]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{folder}: several files share the slide id(s) {', '.join(dupes)}; "
                         f"slide ids (file names without extension) must be unique")
    return slides


def open_slide(path: str | os.PathLike):
    """An `openslide.OpenSlide`, or SlideError(kind='unreadable') naming the file and OpenSlide's reason."""
    import openslide

    path = Path(path)
    sid = slide_id_of(path)
    if not path.is_file():
        raise SlideError(sid, "unreadable", f"{path} does not exist")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        raise SlideError(sid, "unreadable", f"OpenSlide cannot read {path}: {type(e).__name__}: {e}") from None


def slide_mpp(slide) -> float | None:
    """Level-0 microns per pixel from OpenSlide's properties (the mean of x and y), or None."""
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        raw = slide.properties.get(key)
        try:
            value = float(raw) if raw is not None else None
        except ValueError:
            value = None
        if value is not None and value > 0 and math.isfinite(value):
            values.append(value)
    return float(np.mean(values)) if values else None


def choose_level(level_downsamples: Sequence[float], factor: float, tolerance: float = 1e-3) -> int:
    """The level whose downsample is closest below `factor` (the largest one not exceeding it)."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= factor * (1 + tolerance) and ds > level_downsamples[best]:
            best = i
    return best


def patch_geometry(slide, params: TileParams, sid: str = "slide") -> PatchGeometry:
    """Level, read size and level-0 extent of a patch on `slide` for `params`."""
    downsamples = [float(d) for d in slide.level_downsamples]
    step = params.step_size or params.patch_size
    mpp = slide_mpp(slide)
    target = params.target_mpp
    if target is None:
        level = params.level or 0
        if level >= len(downsamples):
            raise SlideError(sid, "resolution", f"level {level} requested but the slide has "
                                                f"{len(downsamples)} level(s)")
        ds = downsamples[level]
        return PatchGeometry(level, ds, params.patch_size, params.patch_size,
                             int(round(params.patch_size * ds)), int(round(step * ds)), mpp, None)
    if mpp is None:
        asked = f"{params.magnification:g}x" if params.magnification is not None else f"{params.mpp:g} um/px"
        raise SlideError(sid, "no_mpp", f"no resolution metadata (openslide.mpp-x/mpp-y), so {asked} cannot be "
                                        f"located; give --level instead, or fix the file's resolution tags")
    factor = target / mpp
    nearest = round(factor)
    if nearest >= 1 and abs(factor - nearest) <= params.mpp_tolerance * factor:
        factor = float(nearest)
    if factor < 1:
        raise SlideError(sid, "resolution", f"requested {target:g} um/px is finer than the slide's level 0 "
                                            f"({mpp:g} um/px); patches would be upsampled")
    level = choose_level(downsamples, factor)
    ds = downsamples[level]
    read_size = max(1, int(round(params.patch_size * factor / ds)))
    return PatchGeometry(level, ds, read_size, params.patch_size, int(round(read_size * ds)),
                         max(1, int(round(step * factor))), mpp, target)


def read_patch(slide, xy: Sequence[int], geometry: PatchGeometry):
    """The patch at level-0 top-left `xy` as an RGB PIL image of `geometry.patch_size` pixels. Transparent
    pixels (outside the scanned area) are white, as a slide's background."""
    from PIL import Image

    size = geometry.read_size
    region = slide.read_region((int(xy[0]), int(xy[1])), geometry.level, (size, size))
    image = _rgba_to_rgb(region)
    if size != geometry.patch_size:
        image = image.resize((geometry.patch_size, geometry.patch_size), Image.BILINEAR)
    return image


def slide_thumbnail(slide, max_size: int):
    """(RGB thumbnail whose longest side is at most `max_size`, its pixels per level-0 pixel (x, y))."""
    image = _rgba_to_rgb(slide.get_thumbnail((max_size, max_size)))
    w0, h0 = slide.level_dimensions[0]
    return image, (image.width / w0, image.height / h0)


def _rgba_to_rgb(image):
    from PIL import Image

    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# tissue segmentation

def _segmentation_image(slide, params: SegmentationParams) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB image to segment and its level-0 pixels per image pixel (x, y)."""
    dims0 = slide.level_dimensions[0]
    level = slide.get_best_level_for_downsample(64) if params.seg_level < 0 else params.seg_level
    if level >= slide.level_count:
        raise ValueError(f"seg_level {params.seg_level} but the slide has {slide.level_count} level(s)")
    w, h = slide.level_dimensions[level]
    if max(w, h) > params.max_seg_size:
        image = _rgba_to_rgb(slide.get_thumbnail((params.max_seg_size, params.max_seg_size)))
    else:
        image = _rgba_to_rgb(slide.read_region((0, 0), level, (w, h)))
    arr = np.asarray(image)
    return arr, (dims0[0] / arr.shape[1], dims0[1] / arr.shape[0])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation as OpenCV computes it for 8-bit images: 255 * (max - min) / max, rounded."""
    rgb = rgb.astype(np.float32)
    hi = rgb.max(axis=-1)
    lo = rgb.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(hi > 0, 255.0 * (hi - lo) / hi, 0.0)
    return np.clip(np.rint(s), 0, 255).astype(np.uint8)


def _median(image: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return image
    from skimage.filters.rank import median

    return median(image, np.ones((size, size), dtype=bool))


def _closing(binary: np.ndarray, size: int) -> np.ndarray:
    """Morphological closing with a size x size square; padded so the border does not erode tissue."""
    if size <= 0:
        return binary
    from scipy import ndimage

    padded = np.pad(binary, size, mode="constant")
    closed = ndimage.binary_closing(padded, structure=np.ones((size, size), dtype=bool))
    return closed[size:-size, size:-size]


def _otsu(image: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if image.min() == image.max():
        return float(image.max())
    return float(threshold_otsu(image))


def segment_tissue(slide, params: SegmentationParams | None = None, sid: str = "slide") -> TissueMask:
    """CLAM-style tissue mask of `slide` (see the module docstring)."""
    from scipy import ndimage

    params = params or SegmentationParams()
    try:
        rgb, scale = _segmentation_image(slide, params)
    except Exception as e:  # OpenSlide raises on corrupt tiles
        raise SlideError(sid, "unreadable", f"cannot read the slide for segmentation: {type(e).__name__}: {e}")
    blurred = _median(saturation(rgb), params.mthresh)
    threshold = _otsu(blurred) if params.use_otsu else params.sthresh
    binary = (blurred > threshold) & (blurred <= params.sthresh_up)
    binary = _closing(binary, params.close)

    ref_area = params.ref_patch_size ** 2 / (scale[0] * scale[1])   # a reference patch in mask pixels
    min_tissue, min_hole = params.a_t * ref_area, params.a_h * ref_area
    # Regions are 8-connected and holes 4-connected, as OpenCV's findContours sees them.
    regions, n = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    labels = np.zeros(binary.shape, dtype=np.int32)
    holes = np.zeros(binary.shape, dtype=bool)
    kept = 0
    largest = 0.0
    for index, box in enumerate(ndimage.find_objects(regions), start=1):
        if box is None:
            continue
        region = regions[box] == index
        area = float(region.sum())
        largest = max(largest, area / ref_area)
        if area <= min_tissue:          # CLAM: area without holes must exceed a_t
            continue
        kept += 1
        filled = ndimage.binary_fill_holes(region)
        labels[box][filled] = kept
        hole_labels, n_holes = ndimage.label(filled & ~region)
        if n_holes:
            areas = ndimage.sum_labels(np.ones_like(hole_labels), hole_labels, index=np.arange(1, n_holes + 1))
            order = np.argsort(-areas, kind="stable")[:params.max_n_holes]
            keep = [i + 1 for i in order if areas[i] > min_hole]
            if keep:
                holes[box] |= np.isin(hole_labels, keep)
    return TissueMask(labels=labels, holes=holes, scale=scale, n_regions=kept, image=rgb, largest_region=largest)


# --------------------------------------------------------------------------------------------------
# patch grid

def _lookup(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """mask value at level-0 points (x0, y0); points outside the mask read 0."""
    mx = np.floor(x0 / scale[0]).astype(np.int64)
    my = np.floor(y0 / scale[1]).astype(np.int64)
    inside = (mx >= 0) & (my >= 0) & (mx < mask.shape[1]) & (my < mask.shape[0])
    out = np.zeros(x0.shape, dtype=mask.dtype)
    out[inside] = mask[my[inside], mx[inside]]
    return out


def patch_grid(tissue: TissueMask, size_level0: int, step_level0: int, contour_fn: str = "four_pt") -> np.ndarray:
    """Level-0 top-left coordinates (N, 2) int64 of patches on `tissue`, region by region as CLAM lays them."""
    from scipy import ndimage

    sx, sy = tissue.scale
    coords = []
    for index, box in enumerate(ndimage.find_objects(tissue.labels), start=1):
        if box is None:
            continue
        ys, xs = box
        start_x, stop_x = int(xs.start * sx), int(math.ceil(xs.stop * sx))
        start_y, stop_y = int(ys.start * sy), int(math.ceil(ys.stop * sy))
        gx, gy = np.meshgrid(np.arange(start_x, stop_x, step_level0), np.arange(start_y, stop_y, step_level0),
                             indexing="ij")     # CLAM's order: x outer, y inner
        x, y = gx.ravel(), gy.ravel()
        keep = _contour_test(tissue.labels == index, x, y, size_level0, tissue.scale, contour_fn)
        cx, cy = x + size_level0 // 2, y + size_level0 // 2
        keep &= ~_lookup(tissue.holes, cx, cy, tissue.scale).astype(bool)
        coords.append(np.stack([x[keep], y[keep]], axis=1))
    if not coords:
        return np.zeros((0, 2), dtype=np.int64)
    out = np.concatenate(coords).astype(np.int64)
    _, first = np.unique(out, axis=0, return_index=True)     # regions' boxes may overlap; keep each once
    return out[np.sort(first)]


def _contour_test(region: np.ndarray, x, y, size: int, scale, contour_fn: str) -> np.ndarray:
    cx, cy = x + size // 2, y + size // 2
    if contour_fn == "basic":
        return _lookup(region, x, y, scale).astype(bool)
    if contour_fn == "center":
        return _lookup(region, cx, cy, scale).astype(bool)
    shift = int(size // 2 * 0.5)
    points = [(cx - shift, cy - shift), (cx + shift, cy + shift), (cx + shift, cy - shift), (cx - shift, cy + shift)]
    hits = np.stack([_lookup(region, px, py, scale).astype(bool) for px, py in points])
    return hits.any(axis=0) if contour_fn == "four_pt" else hits.all(axis=0)


# --------------------------------------------------------------------------------------------------
# HDF5

def save_coords_h5(path: str | os.PathLike, coords: np.ndarray, attrs: dict) -> Path:
    """Write CLAM's coordinate file atomically (temp file + rename)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        dset = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64), maxshape=(None, 2))
        for key, value in attrs.items():
            dset.attrs[key] = value
    os.replace(tmp, path)
    return path


def read_coords_h5(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """`coords` (N, 2) int64 and its attributes from a CLAM coordinate (or feature) file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"coordinate file {path} does not exist")
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise ValueError(f"{path}: no 'coords' dataset (found {', '.join(f.keys()) or 'nothing'}); "
                             f"expected CLAM's layout")
        dset = f["coords"]
        coords = np.asarray(dset[:])
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dset.attrs.items()}
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"{path}: 'coords' has shape {coords.shape}, expected (N, 2)")
    for key in ("patch_level", "patch_size"):
        if key not in attrs:
            raise ValueError(f"{path}: 'coords' lacks the attribute '{key}' (CLAM's layout has it)")
    return coords.astype(np.int64), attrs


def geometry_from_attrs(attrs: dict, slide=None) -> PatchGeometry:
    """The PatchGeometry a coordinate file was written with (CLAM files: no resize unless asked)."""
    level = int(attrs["patch_level"])
    read_size = int(attrs["patch_size"])
    ds = attrs.get("downsample")
    if ds is None and slide is not None:
        ds = slide.level_downsamples[level]
    ds = float(np.mean(np.atleast_1d(ds))) if ds is not None else 1.0
    size0 = int(attrs.get("patch_size_level0", round(read_size * ds)))
    target = int(attrs.get("target_patch_size", read_size))
    return PatchGeometry(level, ds, read_size, target, size0, size0, _opt(attrs.get("mpp")),
                         _opt(attrs.get("target_mpp")))


def _opt(value):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# --------------------------------------------------------------------------------------------------
# one slide, many slides

def tile_slide(path: str | os.PathLike, out_dir: str | os.PathLike, params: TileParams | None = None) -> TileResult:
    """Segment, grid and save one slide: `out_dir/patches/<id>.h5` and `out_dir/thumbnails/<id>.png`.
    Raises SlideError on failure."""
    params = params or TileParams()
    start = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    sid = slide_id_of(path)
    slide = open_slide(path)
    try:
        geometry = patch_geometry(slide, params, sid)
        tissue = segment_tissue(slide, params.seg, sid)
        if tissue.n_regions == 0:
            raise SlideError(sid, "no_tissue", f"no tissue found: no region exceeds --a-t {params.seg.a_t:g} "
                                               f"reference patches ({params.seg.ref_patch_size}^2 level-0 px); "
                                               f"the largest has {tissue.largest_region:.2f}. Lower --a-t "
                                               f"for small slides, --sthresh for faint ones")
        coords = patch_grid(tissue, geometry.size_level0, geometry.step_level0, params.contour_fn)
        if len(coords) == 0:
            raise SlideError(sid, "no_tissue", f"tissue found but no {geometry.size_level0}-pixel patch "
                                               f"passes the '{params.contour_fn}' test")
        h5 = out_dir / "patches" / f"{sid}.h5"
        level_dim = tuple(int(v) for v in slide.level_dimensions[geometry.level])
        attrs = {
            "patch_size": geometry.read_size, "patch_level": geometry.level,
            "downsample": np.array([geometry.downsample, geometry.downsample], dtype=np.float64),
            "downsampled_level_dim": np.array(level_dim, dtype=np.int64), "level_dim": np.array(level_dim, dtype=np.int64),
            "name": sid, "save_path": str(h5.parent),
            "target_patch_size": geometry.patch_size, "patch_size_level0": geometry.size_level0,
            "mpp": geometry.slide_mpp if geometry.slide_mpp is not None else float("nan"),
            "target_mpp": geometry.target_mpp if geometry.target_mpp is not None else float("nan"),
        }
        save_coords_h5(h5, coords, attrs)
        thumb = ""
        if params.thumbnail_size:
            from mambakit.apps.pathology.plots import draw_patch_grid

            image = draw_patch_grid(*slide_thumbnail(slide, params.thumbnail_size), coords, geometry.size_level0,
                                    tissue)
            thumb_path = out_dir / "thumbnails" / f"{sid}.png"
            thumb_path.parent.mkdir(parents=True, exist_ok=True)
            image.save(thumb_path, compress_level=1)     # a preview: fast over small
            thumb = str(thumb_path)
        return TileResult(sid, str(path), "ok", len(coords), str(h5), thumb, seconds=time.perf_counter() - start)
    finally:
        slide.close()


def tile_slides(slides: str | os.PathLike | Iterable, out_dir: str | os.PathLike, params: TileParams | None = None,
                skip_existing: bool = True, progress: bool = True, log=print) -> list[TileResult]:
    """Tile every slide; a failing slide is recorded and the run goes on. Writes `out_dir/tile_summary.csv`
    and prints a summary listing every failure."""
    params = params or TileParams()
    paths = list_slides(slides) if isinstance(slides, (str, os.PathLike)) else [Path(p) for p in slides]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    bar = _progress(paths, "tile", progress)
    for path in bar:
        sid = slide_id_of(path)
        h5 = out_dir / "patches" / f"{sid}.h5"
        if skip_existing and h5.is_file():
            try:
                n = len(read_coords_h5(h5)[0])
                results.append(TileResult(sid, str(path), "skipped", n, str(h5)))
                continue
            except (OSError, ValueError):
                pass   # unreadable leftover: tile again
        try:
            results.append(tile_slide(path, out_dir, params))
        except SlideError as e:
            results.append(TileResult(sid, str(path), "failed", error_kind=e.kind, error=e.message))
            log(f"[tile] {sid}: FAILED ({e.kind}): {e.message}")
        except Exception as e:  # a bug or an unexpected library error on one slide must not stop the run
            results.append(TileResult(sid, str(path), "failed", error_kind="error", error=f"{type(e).__name__}: {e}"))
            log(f"[tile] {sid}: FAILED (error): {type(e).__name__}: {e}")
    write_summary(out_dir / "tile_summary.csv", results)
    log(summary_text("tile", results))
    return results


def write_summary(path: Path, results: Sequence) -> None:
    rows = [asdict(r) for r in results]
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summary_text(stage: str, results: Sequence) -> str:
    ok = [r for r in results if r.status == "ok"]
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    lines = [f"[{stage}] {len(results)} slide(s): {len(ok)} done, {len(skipped)} already done, {len(failed)} failed"]
    for r in failed:
        lines.append(f"  FAILED {r.slide_id} ({r.error_kind}): {r.error}")
    return "\n".join(lines)


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="slide", leave=False)
