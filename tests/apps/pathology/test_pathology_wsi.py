"""Tiling: level choice, tissue segmentation, CLAM's patch grid and HDF5 layout, per-slide errors."""

import numpy as np
import pytest

from mambakit.apps.pathology import wsi
from mambakit.apps.pathology.wsi import SegmentationParams, SlideError, TileParams


def test_choose_level_picks_closest_downsample_below_factor():
    ds = [1.0, 2.0, 4.0, 8.0]
    assert wsi.choose_level(ds, 1.0) == 0
    assert wsi.choose_level(ds, 3.0) == 1
    assert wsi.choose_level(ds, 4.0) == 2
    assert wsi.choose_level(ds, 4.0 * (1 - 1e-4)) == 2       # downsample 4.0002-style wobble
    assert wsi.choose_level(ds, 100.0) == 3
    assert wsi.choose_level([1.0, 4.0002, 16.001], 4.0) == 1


class _FakeSlide:
    def __init__(self, mpp, downsamples=(1.0, 2.0, 4.0)):
        self.properties = {} if mpp is None else {"openslide.mpp-x": str(mpp), "openslide.mpp-y": str(mpp)}
        self.level_downsamples = downsamples


@pytest.mark.parametrize("params, mpp, expected", [
    (TileParams(patch_size=256, magnification=20), 0.5, (0, 256, 256)),
    (TileParams(patch_size=256, magnification=10), 0.5, (1, 256, 512)),     # factor 2 -> level 1 as it is
    (TileParams(patch_size=256, mpp=0.7), 0.5, (0, 358, 358)),              # factor 1.4: read 358 at level 0
    (TileParams(patch_size=256, mpp=1.5), 0.5, (1, 384, 768)),              # factor 3: level 1, read 384
    (TileParams(patch_size=256, magnification=20), 0.2520, (1, 256, 512)),  # 1.984 snaps to 2 (40x scanner)
    (TileParams(patch_size=256, magnification=20), 0.499, (0, 256, 256)),   # 1.002 snaps to 1
    (TileParams(patch_size=224, level=2), None, (2, 224, 896)),             # a level needs no mpp
])
def test_patch_geometry(params, mpp, expected):
    g = wsi.patch_geometry(_FakeSlide(mpp), params)
    assert (g.level, g.read_size, g.size_level0) == expected
    assert g.patch_size == params.patch_size


def test_patch_geometry_errors():
    with pytest.raises(SlideError) as e:
        wsi.patch_geometry(_FakeSlide(None), TileParams(magnification=20), "s1")
    assert e.value.kind == "no_mpp" and "s1" in str(e.value) and "20x" in str(e.value)
    with pytest.raises(SlideError) as e:
        wsi.patch_geometry(_FakeSlide(0.5), TileParams(magnification=40), "s1")   # 0.25 um/px on a 0.5 slide
    assert e.value.kind == "resolution" and "finer" in str(e.value)
    with pytest.raises(SlideError) as e:
        wsi.patch_geometry(_FakeSlide(0.5), TileParams(level=5), "s1")
    assert e.value.kind == "resolution"
    with pytest.raises(ValueError, match="at most one"):
        TileParams(magnification=20, mpp=0.5)


def test_saturation_matches_opencv_definition():
    rgb = np.random.default_rng(0).integers(0, 256, size=(50, 3)).astype(np.uint8)
    rgb[0] = 0                                     # black: saturation 0, not nan
    hi, lo = rgb.max(1).astype(float), rgb.min(1).astype(float)
    expected = np.where(hi > 0, np.rint(255 * (hi - lo) / np.maximum(hi, 1)), 0)
    np.testing.assert_array_equal(wsi.saturation(rgb[None])[0], expected)


def test_segmentation_finds_tissue_and_holes(slide_factory):
    path = slide_factory(disks=[(300, 300, 200), (800, 500, 120)], holes=[(300, 300, 60)], size=(1024, 768))
    slide = wsi.open_slide(path)
    tissue = wsi.segment_tissue(slide, SegmentationParams(seg_level=0, a_t=0.05, a_h=0.01))
    assert tissue.n_regions == 2
    sx, sy = tissue.scale
    assert tissue.labels[int(300 / sy), int(180 / sx)] > 0               # inside the ring
    assert tissue.labels[int(300 / sy), int(300 / sx)] > 0               # a hole is inside its region ...
    assert tissue.holes[int(300 / sy), int(300 / sx)]                    # ... and marked as a hole
    assert tissue.labels[int(700 / sy), int(100 / sx)] == 0              # background
    # a_t filters small regions: the small disk (area ~0.17 ref patches) goes, the big one stays
    tissue = wsi.segment_tissue(slide, SegmentationParams(seg_level=0, a_t=0.3, a_h=0.01))
    assert tissue.n_regions == 1
    # a_h filters small holes
    tissue = wsi.segment_tissue(slide, SegmentationParams(seg_level=0, a_t=0.05, a_h=1.0))
    assert not tissue.holes.any()


def test_patch_grid_follows_clam_four_point_rule(slide_factory):
    path = slide_factory(disks=[(512, 384, 300)], holes=[(512, 384, 90)], size=(1024, 768))
    slide = wsi.open_slide(path)
    tissue = wsi.segment_tissue(slide, SegmentationParams(seg_level=0, a_t=0.05, a_h=0.01))
    size = 128
    coords = wsi.patch_grid(tissue, size, size)
    assert len(coords) > 0 and len(np.unique(coords, axis=0)) == len(coords)
    sx, sy = tissue.scale
    region = tissue.labels > 0

    def inside(mask, x, y):
        mx, my = int(np.floor(x / sx)), int(np.floor(y / sy))
        return 0 <= mx < mask.shape[1] and 0 <= my < mask.shape[0] and bool(mask[my, mx])

    # brute force over the region's bounding-box grid: kept <=> one of 4 points in the region, centre not in a hole
    ys, xs = np.nonzero(region)
    x0, y0 = int(xs.min() * sx), int(ys.min() * sy)
    x1, y1 = int(np.ceil((xs.max() + 1) * sx)), int(np.ceil((ys.max() + 1) * sy))
    expected = set()
    shift = int(size // 2 * 0.5)
    for x in range(x0, x1, size):
        for y in range(y0, y1, size):
            cx, cy = x + size // 2, y + size // 2
            pts = [(cx - shift, cy - shift), (cx + shift, cy + shift), (cx + shift, cy - shift), (cx - shift, cy + shift)]
            if any(inside(region, *p) for p in pts) and not inside(tissue.holes, cx, cy):
                expected.add((x, y))
    assert set(map(tuple, coords.tolist())) == expected
    # the hole's centre patch is excluded
    assert not any(x <= 512 < x + size and y <= 384 < y + size for x, y in coords)


def test_tile_slide_writes_clam_h5_and_thumbnail(slide_factory, tmp_path, small_tile_params):
    path = slide_factory(disks=[(512, 384, 300)], size=(1024, 768), mpp=0.5)
    params = TileParams(patch_size=64, magnification=10, seg=small_tile_params.seg, thumbnail_size=200)
    result = wsi.tile_slide(path, tmp_path / "out", params)
    assert result.status == "ok" and result.n_patches > 0
    coords, attrs = wsi.read_coords_h5(result.h5)
    assert coords.dtype == np.int64 and coords.shape == (result.n_patches, 2)
    # CLAM's attributes: patch_size is what is read at patch_level (10x on a 0.5 um/px slide: level 1, 64 px)
    assert attrs["patch_level"] == 1 and attrs["patch_size"] == 64 and attrs["target_patch_size"] == 64
    assert attrs["patch_size_level0"] == 128 and attrs["name"] == "slide_a"
    np.testing.assert_allclose(attrs["downsample"], [2.0, 2.0])
    assert tuple(attrs["level_dim"]) == (512, 384) and tuple(attrs["downsampled_level_dim"]) == (512, 384)
    assert attrs["mpp"] == pytest.approx(0.5) and attrs["target_mpp"] == pytest.approx(1.0)
    assert {"save_path"} <= set(attrs)
    from PIL import Image

    thumb = Image.open(result.thumbnail)
    assert max(thumb.size) == 200


def test_read_patch_reads_level0_pixels_and_resizes(slide_factory):
    path = slide_factory(disks=[(512, 384, 300)], size=(1024, 768), seed=3)
    slide = wsi.open_slide(path)
    g = wsi.patch_geometry(slide, TileParams(patch_size=100, level=0))
    patch = np.asarray(wsi.read_patch(slide, (300, 200), g))
    region = np.asarray(slide.read_region((300, 200), 0, (100, 100)).convert("RGB"))
    np.testing.assert_array_equal(patch, region)
    g2 = wsi.patch_geometry(slide, TileParams(patch_size=50, mpp=1.0))   # factor 2 -> level 1, no resize
    assert (g2.level, g2.read_size) == (1, 50)
    assert wsi.read_patch(slide, (300, 200), g2).size == (50, 50)
    g3 = wsi.patch_geometry(slide, TileParams(patch_size=50, mpp=0.75))  # factor 1.5 -> level 0 read 75, resize
    assert (g3.level, g3.read_size) == (0, 75) and wsi.read_patch(slide, (0, 0), g3).size == (50, 50)


def test_tile_slides_collects_failures_and_goes_on(slide_factory, tmp_path, small_tile_params):
    folder = tmp_path / "slides"
    slide_factory("good", folder=folder)
    slide_factory("blank", folder=folder, disks=())
    slide_factory("nompp", folder=folder, mpp=None)
    (folder / "corrupt.svs").write_bytes(b"not a slide at all")
    params = TileParams(patch_size=128, magnification=20, seg=small_tile_params.seg, thumbnail_size=0)
    lines = []
    results = wsi.tile_slides(folder, tmp_path / "out", params, progress=False, log=lines.append)
    by_id = {r.slide_id: r for r in results}
    assert by_id["good"].status == "ok"
    assert (by_id["blank"].status, by_id["blank"].error_kind) == ("failed", "no_tissue")
    assert (by_id["nompp"].status, by_id["nompp"].error_kind) == ("failed", "no_mpp")
    assert (by_id["corrupt"].status, by_id["corrupt"].error_kind) == ("failed", "unreadable")
    summary = (tmp_path / "out" / "tile_summary.csv").read_text()
    assert "corrupt" in summary and "no_mpp" in summary
    assert any("3 failed" in line for line in lines)
    # resumable: a second run skips the finished slide
    again = {r.slide_id: r for r in wsi.tile_slides(folder, tmp_path / "out", params, progress=False, log=lambda *_: None)}
    assert again["good"].status == "skipped" and again["good"].n_patches == by_id["good"].n_patches


def test_list_slides_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wsi.list_slides(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no slides"):
        wsi.list_slides(tmp_path)
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "a.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="share the slide id"):
        wsi.list_slides(tmp_path)


def test_read_coords_h5_rejects_other_layouts(tmp_path):
    import h5py

    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="patch_level"):
        wsi.read_coords_h5(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no 'coords'"):
        wsi.read_coords_h5(path)
