"""End to end: heatmaps from a checkpoint, and the embedded-cohort pipeline
(cohort -> tile -> extract -> train -> eval -> heatmaps -> report).

The report gives each model's test metrics and, for attention models, how much attention falls on the
planted tumour patches of the positive test slides compared with their share of the patches
(`attention_on_tumour` / `tumour_patch_share`; 1x means no better than uniform attention). A patch counts as
tumour when at least half of it lies inside a planted region.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .data import Bag, load_features, strip_slide_suffix
from .wsi import SLIDE_EXTENSIONS, open_slide

__all__ = ["model_from_checkpoint", "bag_scores", "heatmap_for_bag", "heatmap_for_slide", "find_slide",
           "CohortRun", "run_cohort_pipeline", "attention_report", "format_report"]


# --------------------------------------------------------------------------------------------------
# checkpoints and heatmaps

def _n_outputs(state: dict) -> int:
    for key in ("classifier.weight", "classifier.0.weight"):
        if key in state:
            return int(state[key].shape[0])
    heads = sorted((int(k.split(".")[1]), k) for k in state if k.startswith("head.") and k.endswith(".weight"))
    if heads:
        return int(state[heads[-1][1]].shape[0])
    raise ValueError("cannot find the classifier in the checkpoint (classifier.weight / head.N.weight)")


def rebuild_mil_model(config: dict, weights, source: str):
    """The MIL model of a training checkpoint's saved recipe, with fresh weights, without the features or the
    label CSV: the number of outputs (classes, or survival bins) is the row count of the classifier's weight.
    (The app's `rebuild_model` hook, behind `zoo.load_pretrained("runs/<x>")`, and `model_from_checkpoint`.)"""
    from mambakit.engine.config import from_dict

    from .config import MILRecipe
    from .models import build_mil_model

    recipe = from_dict(MILRecipe, config, source)
    params = dict(vars(recipe.model))
    name, in_dim = params.pop("name"), params.pop("in_dim")
    try:
        n_outputs = _n_outputs(weights)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return build_mil_model(name, in_dim, n_outputs, **params)


def model_from_checkpoint(checkpoint: str | Path, use_ema: bool = False):
    """(model in eval mode, recipe, class names) from a training checkpoint or run folder."""
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint
    from mambakit.engine.config import from_dict
    from mambakit.engine.trainer import load_model_state

    from .config import MILRecipe

    path = resolve_checkpoint(checkpoint, prefer="best")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{path} holds no saved recipe; it is not a mambakit pathology checkpoint")
    source = f"{path} (saved config)"
    recipe = from_dict(MILRecipe, state["config"], source)
    weights = state["ema" if use_ema else "model"]
    if weights is None:
        raise ValueError(f"{path} has no {'EMA ' if use_ema else ''}weights")
    model = rebuild_mil_model(state["config"], weights, source)
    load_model_state(model, weights, str(path))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    classes_file = run_dir / "classes.json"
    classes = json.loads(classes_file.read_text())["classes"] if classes_file.is_file() else None
    return model.eval(), recipe, classes


@torch.no_grad()
def bag_scores(model, features: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(logits (1, C), per-instance scores (N,))."""
    logits, scores = model(features, return_scores=True)
    return logits, scores[0].detach().cpu().numpy()


def find_slide(slides_dir: str | Path, slide_id: str) -> Path:
    folder = Path(slides_dir)
    for ext in SLIDE_EXTENSIONS:
        for candidate in (folder / f"{slide_id}{ext}", folder / f"{slide_id}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no slide file for {slide_id!r} in {folder} (looked for {', '.join(SLIDE_EXTENSIONS)})")


def _patch_size_level0(h5: Path) -> int:
    from .wsi import geometry_from_attrs, read_coords_h5

    _, attrs = read_coords_h5(h5)
    return geometry_from_attrs(attrs).size_level0


def _h5_for(path: Path) -> Path:
    return path if path.suffix == ".h5" else path.parent.parent / "h5_files" / f"{path.stem}.h5"


def _title(logits: torch.Tensor, classes, survival: bool) -> str:
    if survival:
        from .losses import hazards_and_survival

        _, s = hazards_and_survival(logits.float())
        return f"risk (-sum S) = {float(-s.sum()):.3f}"
    probs = torch.softmax(logits.float(), dim=1)[0]
    top = int(probs.argmax())
    name = classes[top] if classes and top < len(classes) else f"class {top}"
    return f"predicted {name} (p = {float(probs[top]):.3f})"


def heatmap_for_bag(model, bag: Bag, slides_dir: str | Path, out: str | Path, classes=None, survival: bool = False,
                    normalize: str = "percentile", max_size: int = 1024, regions: dict | None = None) -> list[Path]:
    """Draw the bag's per-patch scores over each of its slides. A bag of several slides gets one PNG per
    slide (`<out stem>_<slide_id>.png`). `regions`: slide id -> level-0 boxes to outline."""
    parts = [load_features(_h5_for(p), with_coords=True) for p in bag.paths]
    feats = torch.cat([f for f, _ in parts])
    logits, scores = bag_scores(model, feats)
    title = _title(logits, classes, survival)
    out = Path(out)
    written, start = [], 0
    for sid, path, (f, coords) in zip(bag.slide_ids, bag.paths, parts):
        n = len(f)
        target = out if len(bag.slide_ids) == 1 else out.with_name(f"{out.stem}_{strip_slide_suffix(sid)}.png")
        written.append(heatmap_for_slide(find_slide(slides_dir, strip_slide_suffix(sid)), scores[start:start + n],
                                         coords, _patch_size_level0(_h5_for(path)), target, title=f"{sid}: {title}",
                                         normalize=normalize, max_size=max_size,
                                         regions=(regions or {}).get(strip_slide_suffix(sid), ())))
        start += n
    return written


def heatmap_for_slide(slide_path: str | Path, scores: np.ndarray, coords: np.ndarray, size_level0: int,
                      out: str | Path, title: str = "", normalize: str = "percentile", max_size: int = 1024,
                      regions: Sequence = ()) -> Path:
    from .plots import draw_heatmap, save_heatmap

    slide = open_slide(slide_path)
    try:
        image = draw_heatmap(slide, scores, coords, size_level0, max_size=max_size, normalize=normalize,
                             regions=[r["box"] if isinstance(r, dict) else r for r in regions])
    finally:
        slide.close()
    return save_heatmap(image, out, title=title, normalize=normalize)


# --------------------------------------------------------------------------------------------------
# the embedded cohort, end to end

@dataclass
class CohortRun:
    """What the cohort pipeline runs. `recipes`: recipe files (one model each) trained on the same features."""
    out_dir: str
    recipes: list[str]
    spec: str = "full"                  # full | quick (cohort.FULL / cohort.QUICK)
    seed: int = 0
    input_size: int = 224               # pixels the extractor sees
    num_workers: int = 1
    batch_size: int = 32
    heatmaps: int = 3                   # test slides drawn per attention model (positives first)
    calibrate_bn: int = 512             # patches for the random backbone's BatchNorm statistics
    overrides: list[str] = field(default_factory=list)
    sources: str | None = None          # a folder with the three source files (default: data registry)


def attention_report(model, bags: list[Bag], manifest: dict, labels_positive: int = 1) -> dict:
    """Attention mass on planted tumour patches of positive bags vs those patches' share of the bag."""
    from .cohort import planted_fraction

    slides = {s["slide_id"]: s for s in manifest["slides"]}
    masses, shares = [], []
    for bag in bags:
        if bag.label != labels_positive:
            continue
        feats, coords = load_features(_h5_for(bag.paths[0]), with_coords=True)
        try:
            _, scores = bag_scores(model, feats)
        except NotImplementedError:
            return {}
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
    from .features import ExtractParams, extract_slides
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
    params = ExtractParams(backbone="resnet50_trunc", random_weights=True, batch_size=run.batch_size,
                           num_workers=run.num_workers, input_size=run.input_size, calibrate_bn=run.calibrate_bn,
                           tile=tile)
    results = extract_slides(cohort_dir / "slides", out / "features", params, progress=progress, log=log)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise ValueError(f"{len(failed)} cohort slide(s) failed: " + "; ".join(f"{r.slide_id}: {r.error}" for r in failed))
    timings["tile_extract_s"] = time.perf_counter() - t
    n_patches = int(sum(len(load_features(out / "features" / "pt_files" / f"{s['slide_id']}.pt"))
                        for s in manifest["slides"]))

    base = [f"data.csv={cohort_dir / 'labels.csv'}", f"data.features={out / 'features'}",
            f"data.split_dir={cohort_dir / 'splits'}", "data.fold=0", "run.progress=false",
            f"train.seed={run.seed}"]
    report = {"cohort": {"slides": len(manifest["slides"]), "patches": n_patches, "spec": manifest["spec"],
                         "sources_sha256": manifest["sources"]},
              "extractor": {"backbone": "resnet50_trunc (CLAM)", "weights": "RANDOM (explicit --random-weights: no "
                            "pretrained weights can be downloaded here)", "input_size": run.input_size,
                            "batchnorm_calibration_patches": run.calibrate_bn, "patch": "256 px at 20x (0.5 um/px)"},
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
        entry["seconds"] = time.perf_counter() - t
        report["models"][name] = entry
        log(f"[cohort] {entry['title']}: test AUC {entry['test'].get('auc', float('nan')):.3f} "
            f"({entry['seconds']:.0f}s)" + (f", attention on tumour {attention['attention_on_tumour']:.2f} vs "
                                            f"share {attention['tumour_patch_share']:.2f}" if attention else ""))
    timings["total_s"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "report.md").write_text(format_report(report) + "\n")
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
