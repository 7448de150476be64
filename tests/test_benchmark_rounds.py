"""The benchmarks' --rounds bookkeeping (benchmarks/rounds.py, used by vision.py and mil.py): per-round
ratios, medians over rounds, failures."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vision():
    return _load("vision")


@pytest.fixture(scope="module")
def mil():
    return _load("mil")


def point(model, res, rnd, time_s=None, peak=10.0, **extra):
    p = {"model": model, "resolution": res, "batch": 1, "mode": "train", "round": rnd, "peak_mib": peak, **extra}
    if time_s is not None:
        p["time_s"] = time_s
    return p


VIM, DEIT = "vim_tiny_patch16_224", "deit_tiny_patch16_224"


def test_speedup_pairs_points_of_the_same_round(vision):
    # the machine is twice as slow in round 1: per-round ratios stay 2.0 and 1.5, a ratio of medians would not
    points = [point(VIM, 1024, 0, 1.0), point(DEIT, 1024, 0, 2.0),
              point(VIM, 1024, 1, 2.0), point(DEIT, 1024, 1, 3.0),
              point(VIM, 1024, 2, 1.0), point(DEIT, 1024, 2, 2.5)]
    med, lo, hi = vision.speedup(points, VIM, DEIT, 1024, 1, "train")
    assert (med, lo, hi) == (2.0, 1.5, 2.5)
    merged = vision.merge_rounds(points)
    assert merged[(VIM, 1024, 1, "train")]["time_s"] == 1.0
    assert merged[(DEIT, 1024, 1, "train")]["round_values"] == [2.0, 3.0, 2.5]


def test_a_failed_round_is_reported_and_the_other_rounds_still_pair(vision):
    points = [point(VIM, 768, 0, 1.0, peak=5.0), point(DEIT, 768, 0, 1.5),
              point(VIM, 768, 1, None, error="over the 12 GiB cap", over_cap=True), point(DEIT, 768, 1, 1.4),
              point(VIM, 768, 2, 1.1, peak=7.0), point(DEIT, 768, 2, 1.6)]
    merged = vision.merge_rounds(points)
    assert merged[(VIM, 768, 1, "train")]["error"] == "over the 12 GiB cap"
    med, lo, hi = vision.speedup(points, VIM, DEIT, 768, 1, "train")
    assert lo == pytest.approx(1.6 / 1.1) and hi == 1.5


def test_crossover_uses_the_median_per_round_speedup(vision):
    points = []
    for rnd, (t768, t1024) in enumerate([(1.2, 1.0), (0.9, 1.0), (1.1, 1.0)]):
        points += [point(VIM, 768, rnd, 1.0), point(DEIT, 768, rnd, t768),
                   point(VIM, 1024, rnd, 1.0), point(DEIT, 1024, rnd, 2.0 * t1024)]
    (row,) = vision.crossovers(points, ["vim"], [768, 1024], modes=("train",))
    assert row["speedups"] == {768: 1.1, 1024: 2.0}
    assert row["overtakes_at"] == 768
    text = vision.markdown(points, {"args": {"pairs": ["vim"], "batches": [1], "resolutions": [768, 1024],
                                             "threads": 2, "min_repeats": 2, "mem_cap_gib": 12, "rounds": 3},
                                    "machine": {}, "generated": "now", "crossovers": [row]})
    assert "| train | 1 | 768 | 1000 ms | 1100 ms | 1.10x (0.90-1.20) |" in text


def test_mil_table_takes_ratios_within_rounds_and_reports_failures(mil):
    results = [{"model": "mambamil_lean", "size": 100000, "status": "ok", "time_s": 50.0, "peak_gib": 6.6, "round": 0},
               {"model": "transmil", "size": 100000, "status": "ok", "time_s": 60.0, "peak_gib": 9.8, "round": 0},
               {"model": "transmil", "size": 100000, "status": "ok", "time_s": 90.0, "peak_gib": 9.7, "round": 1},
               {"model": "mambamil_lean", "size": 100000, "status": "ok", "time_s": 70.0, "peak_gib": 6.5, "round": 1},
               {"model": "abmil", "size": 100000, "status": "oom", "detail": "killed", "round": 0}]
    text = mil.table(results, [100000])
    lean = next(line for line in text.splitlines() if "memory-efficient" in line)
    assert "| 60.00 | 6.600 |" in lean                       # median time, largest peak
    assert "| 1.24x (1.20-1.29) |" in lean                    # 60/50 and 90/70, not 75/60
    assert "| OOM |" in next(line for line in text.splitlines() if "ABMIL" in line)
