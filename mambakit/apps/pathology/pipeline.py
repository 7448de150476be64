"""The embedded-cohort pipeline, end to end: cohort -> tile -> extract -> train -> eval -> heatmaps -> report.

The report gives each model's test metrics and, for attention models, how much attention falls on the
planted tumour patches of the positive test slides compared with their share of the patches
(`attention_on_tumour` / `tumour_patch_share`; 1x means no better than uniform attention). A patch counts as
tumour when at least half of it lies inside a planted region.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mambakit.engine.logs import format_artefacts, list_artefacts

from .data import Bag, load_features
from .inference import _h5_for, _patch_size_level0, bag_scores, heatmap_for_bag, model_from_checkpoint

__all__ = ["CohortRun", "run_cohort_pipeline", "attention_report", "format_report"]


# --------------------------------------------------------------------------------------------------
# the embedded cohort, end to end

@dataclass
class CohortRun:
    """What the cohort pipeline runs. `recipes`: recipe files (one model each) trained on the same features."""
    out_dir: str
    recipes: list[str]
    spec: str = "full"                  # full | quick (cohort.FULL / cohort.QUICK)
    seed: int = 0                       # the cohort's seed (which slides)
    train_seed: int | None = None       # the models' seed (default: `seed`)
    backbone: str = "hed_stats"         # weight-free stain / texture descriptor; or resnet50_trunc (random)
    input_size: int | None = None       # pixels the extractor sees (default: the backbone's)
    num_workers: int | None = None      # patch-reading processes per slide (default: 0 for weight-free
                                        # features, where starting a worker per small slide costs more
                                        # than reading in this process; else 1)
    batch_size: int = 32
    heatmaps: int = 3                   # test slides drawn per attention model (positives first)
    calibrate_bn: int = 512             # resnet50_trunc: patches for the random backbone's BatchNorm statistics
    standardize: int = 256              # hed_stats: patches for the per-feature mean / std
    overrides: list[str] = field(default_factory=list)
    sources: str | None = None          # a folder with the three source files (default: data registry)


def attention_report(model, bags: list[Bag], manifest: dict, labels_positive: int = 1) -> dict:
    """Attention mass on planted tumour patches of positive bags vs those patches' share of the bag; {} for a
    model without attention weights (mean / max pooling score instances by logits, which can be negative)."""
    from .cohort import planted_fraction

    if not getattr(model, "scores_are_attention", False):
        return {}

    slides = {s["slide_id"]: s for s in manifest["slides"]}
    masses, shares = [], []
    for bag in bags:
        if bag.label != labels_positive:
            continue
        feats, coords = load_features(_h5_for(bag.paths[0]), with_coords=True)
        _, scores = bag_scores(model, feats)
        size0 = _patch_size_level0(_h5_for(bag.paths[0]))
        tumour = planted_fraction(coords, size0, slides[bag.slide_ids[0]]["regions"]) >= 0.5
        if not tumour.any():
            continue
        masses.append(float(scores[tumour].sum() / scores.sum()))
        shares.append(float(tumour.mean()))
    if not masses:
        return {}
    mass, share = float(np.mean(masses)), float(np.mean(shares))
    return {"attention_on_tumour": mass, "tumour_patch_share": share, "enrichment": mass / share,
            "positive_test_slides": len(masses)}


def run_cohort_pipeline(run: CohortRun, log: Callable = print, progress: bool = True) -> dict:
    """Build the cohort, tile, extract, train every recipe, evaluate, draw heatmaps; return the report
    (also written to out_dir/report.json and report.md)."""
    from mambakit.engine.config import load_config
    from mambakit.engine.trainer import Trainer

    from .cohort import FULL, QUICK, build_cohort
    from .config import MODEL_TITLES, MILRecipe
    from .features import WEIGHT_FREE, ExtractParams, extract_slides
    from .task import MILTask
    from .wsi import SegmentationParams, TileParams

    out = Path(run.out_dir)
    timings = {}
    started = time.perf_counter()
    spec = {"full": FULL, "quick": QUICK}[run.spec]
    if run.seed != spec.seed:
        from dataclasses import replace

        spec = replace(spec, seed=run.seed)
    cohort_dir = out / "cohort"
    manifest = build_cohort(cohort_dir, spec, sources=run.sources, log=log, progress=progress)
    timings["cohort_s"] = time.perf_counter() - started

    t = time.perf_counter()
    tile = TileParams(patch_size=256, magnification=20, seg=SegmentationParams(a_t=1, a_h=1), thumbnail_size=512)
    weight_free = run.backbone in WEIGHT_FREE
    num_workers = run.num_workers if run.num_workers is not None else (0 if weight_free else 1)
    params = ExtractParams(backbone=run.backbone, random_weights=not weight_free, batch_size=run.batch_size,
                           num_workers=num_workers, input_size=run.input_size,
                           calibrate_bn=0 if weight_free else run.calibrate_bn,
                           standardize=run.standardize if weight_free else 0, tile=tile)
    results = extract_slides(cohort_dir / "slides", out / "features", params, progress=progress, log=log)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise ValueError(f"{len(failed)} cohort slide(s) failed: " + "; ".join(f"{r.slide_id}: {r.error}" for r in failed))
    timings["tile_extract_s"] = time.perf_counter() - t
    n_patches = int(sum(len(load_features(out / "features" / "pt_files" / f"{s['slide_id']}.pt"))
                        for s in manifest["slides"]))

    meta = json.loads((out / "features" / "features_meta.json").read_text())
    base = [f"data.csv={cohort_dir / 'labels.csv'}", f"data.features={out / 'features'}", f"model.in_dim={meta['dim']}",
            f"data.split_dir={cohort_dir / 'splits'}", "data.fold=0", "run.progress=false",
            f"train.seed={run.seed if run.train_seed is None else run.train_seed}"]
    report = {"cohort": {"slides": len(manifest["slides"]), "patches": n_patches, "spec": manifest["spec"],
                         "sources_sha256": manifest["sources"]},
              "extractor": {"backbone": meta["backbone"], "dim": meta["dim"], "input_size": meta["input_size"],
                            "weights": ("RANDOM (explicit --random-weights: no pretrained weights can be downloaded "
                                        "here)") if meta["random_weights"] else meta["weights"],
                            "batchnorm_calibration_patches": (meta["batchnorm_calibration"] or {}).get("patches"),
                            "standardization_patches": (meta.get("standardization") or {}).get("patches"),
                            "patch": "256 px at 20x (0.5 um/px)"},
              "models": {}, "timings_s": timings}
    for recipe_path in run.recipes:
        t = time.perf_counter()
        config = load_config(MILRecipe, recipe_path, base + list(run.overrides))
        name = Path(recipe_path).stem
        task = MILTask(config)
        result = Trainer(task).fit(out / "runs" / name, name_hint=f"pathology-{name}")
        model = task.build_model()
        best = result.best_checkpoint or result.last_checkpoint
        model, _, classes = model_from_checkpoint(best)
        entry = {"title": MODEL_TITLES.get(config.model.name, config.model.name), "recipe": str(recipe_path),
                 "test": {k.removeprefix("test/"): v for k, v in result.metrics.items() if k.startswith("test/")},
                 "val": {k.removeprefix("val/"): v for k, v in result.metrics.items() if k.startswith("val/")},
                 "epochs": result.epochs, "best_epoch": result.best_epoch, "run_dir": str(result.run_dir)}
        attention = attention_report(model, task.splits["test"], manifest)
        if attention:
            entry["attention"] = attention
            drawn = sorted(task.splits["test"], key=lambda b: -b.label)[: run.heatmaps]
            regions = {s["slide_id"]: s["regions"] for s in manifest["slides"]}
            entry["heatmaps"] = [str(p) for bag in drawn for p in heatmap_for_bag(
                model, bag, cohort_dir / "slides", Path(result.run_dir) / "heatmaps" / f"{bag.bag_id}.png",
                classes=classes, regions=regions, max_size=512)]
            heatmaps = Path(result.run_dir) / "heatmaps"      # drawn after fit, so not in its list of files
            log(format_artefacts(heatmaps, list_artefacts(heatmaps)))
        entry["seconds"] = time.perf_counter() - t
        report["models"][name] = entry
        log(f"[cohort] {entry['title']}: test AUC {entry['test'].get('auc', float('nan')):.3f} "
            f"({entry['seconds']:.0f}s)" + (f", attention on tumour {attention['attention_on_tumour']:.2f} vs "
                                            f"share {attention['tumour_patch_share']:.2f}" if attention else ""))
    timings["total_s"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "report.md").write_text(format_report(report) + "\n")
    log(f"[cohort] wrote {out / 'report.json'} and {out / 'report.md'}")
    return report


def format_report(report: dict) -> str:
    c = report["cohort"]
    lines = [f"Embedded cohort: {c['slides']} slides, {c['patches']} patches; extractor "
             f"{report['extractor']['backbone']} with {report['extractor']['weights']}, input "
             f"{report['extractor']['input_size']} px.", "",
             "| model | test AUC | test acc | test bal. acc | test F1 | attention on tumour | tumour patch share | "
             "enrichment |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for entry in report["models"].values():
        test, att = entry["test"], entry.get("attention", {})
        enrichment = f"{att['enrichment']:.2f}x" if att else "n/a"
        lines.append(f"| {entry['title']} | {fmt(test.get('auc'))} | {fmt(test.get('acc'))} | "
                     f"{fmt(test.get('balanced_acc'))} | {fmt(test.get('f1'))} | {fmt(att.get('attention_on_tumour'))} | "
                     f"{fmt(att.get('tumour_patch_share'))} | {enrichment} |")
    t = report["timings_s"]
    lines += ["", "Wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f}s" for k, v in t.items())]
    return "\n".join(lines)
