"""`mambakit pathology ...`: whole slides to features, MIL training, heatmaps, the embedded cohort.

    mambakit pathology tile    --slides DIR --out DIR [--magnification 20 | --mpp 0.5 | --level 0] [--patch-size 256]
    mambakit pathology extract --slides DIR --out DIR [--coords DIR] [--backbone resnet50_trunc | timm:NAME]
                               [--weights NAME|PATH | --random-weights]      (torchrun shards slides over ranks)
    mambakit pathology train   -c configs/pathology/mambamil_luad_lusc.yaml [key=value ...] [--folds all]
    mambakit pathology eval    --checkpoint RUN_DIR [--split test]
    mambakit pathology finetune --pretrained NAME|PATH -c RECIPE.yaml
    mambakit pathology heatmap --checkpoint RUN_DIR --slide SLIDE.svs [--features DIR] --out heatmap.png
    mambakit pathology cohort  --out DIR [--quick] [--run]
    mambakit pathology convert --checkpoint s_0_checkpoint.pt --model mamba_mil --mixer SRMamba --rate 5 --out model.pt

Kept cheap to import (`mambakit --help` loads it): torch, OpenSlide and friends load inside the verbs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mambakit.engine.app import App, QuickstartResult, Verb
from mambakit.engine.runner import eval_verb, finetune_verb

from .config import MILRecipe

__all__ = ["APP", "quickstart", "QUICK_RECIPES", "COHORT_RECIPES", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "pathology"
QUICK_RECIPES = (CONFIG_DIR / "quick_cohort_mambamil.yaml", CONFIG_DIR / "quick_cohort_meanmil.yaml")
COHORT_RECIPES = tuple(CONFIG_DIR / f"cohort_{m}.yaml" for m in ("mambamil", "abmil", "transmil", "meanmil"))


def _task(config):
    from .task import MILTask

    return MILTask(config)


# --------------------------------------------------------------------------------------------------
# tile / extract

def _add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tiling (CLAM's parameters and defaults)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--magnification", type=float, default=None, help="e.g. 20 (= 0.5 um/px); needs mpp metadata")
    where.add_argument("--mpp", type=float, default=None, help="microns per pixel of the patches, e.g. 0.5")
    where.add_argument("--level", type=int, default=None, help="read this pyramid level as it is (CLAM's --patch_level)")
    g.add_argument("--patch-size", type=int, default=256, help="patch side in pixels after resizing (default 256)")
    g.add_argument("--step-size", type=int, default=None, help="grid step in output pixels (default: patch size)")
    g.add_argument("--seg-level", type=int, default=-1, help="segmentation level (-1: closest to 64x down)")
    g.add_argument("--sthresh", type=int, default=8, help="saturation threshold 0-255 (default 8)")
    g.add_argument("--mthresh", type=int, default=7, help="median blur kernel (default 7)")
    g.add_argument("--close", type=int, default=4, help="closing kernel (default 4; 0: off)")
    g.add_argument("--use-otsu", action="store_true", help="Otsu threshold instead of --sthresh")
    g.add_argument("--a-t", type=float, default=100, help="min tissue area in 512^2 reference patches (default 100)")
    g.add_argument("--a-h", type=float, default=16, help="min hole area in reference patches (default 16)")
    g.add_argument("--max-n-holes", type=int, default=8)
    g.add_argument("--contour-fn", default="four_pt", choices=["four_pt", "four_pt_hard", "center", "basic"])
    g.add_argument("--thumbnail-size", type=int, default=1024, help="QC thumbnail's longest side (0: none)")


def _tile_params(args):
    from .wsi import SegmentationParams, TileParams

    seg = SegmentationParams(seg_level=args.seg_level, sthresh=args.sthresh, mthresh=args.mthresh, close=args.close,
                             use_otsu=args.use_otsu, a_t=args.a_t, a_h=args.a_h, max_n_holes=args.max_n_holes)
    return TileParams(patch_size=args.patch_size, step_size=args.step_size, magnification=args.magnification,
                      mpp=args.mpp, level=args.level, contour_fn=args.contour_fn, seg=seg,
                      thumbnail_size=args.thumbnail_size)


def _tile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slides", required=True, metavar="DIR", help="folder of slides (svs, ndpi, mrxs, tif, ...)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="writes patches/<slide>.h5 (CLAM layout), thumbnails/<slide>.png, tile_summary.csv")
    parser.add_argument("--no-skip", action="store_true", help="tile slides again even when their .h5 exists")
    _add_tile_arguments(parser)


def _tile_run(args) -> int:
    from .wsi import tile_slides

    results = tile_slides(args.slides, args.out, _tile_params(args), skip_existing=not args.no_skip)
    return 1 if results and all(r.status == "failed" for r in results) else 0


def _add_extractor_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("feature extractor")
    g.add_argument("--backbone", default=None,
                   help="resnet50_trunc (CLAM's, 1024-d), hed_stats (weight-free stain deconvolution with colour "
                        "and texture statistics, 46-d) or timm:<model name> (default resnet50_trunc)")
    g.add_argument("--weights", default=None, metavar="NAME|PATH",
                   help="zoo weights name or a local file (default: the backbone's zoo weights)")
    g.add_argument("--random-weights", action="store_true",
                   help="use an untrained backbone (tests and demos only: the features mean nothing)")
    g.add_argument("--calibrate-bn", type=int, default=0, metavar="N",
                   help="with --random-weights: estimate BatchNorm statistics on N patches of the slides first")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--num-workers", type=int, default=2, help="patch-reading worker processes (default 2)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--input-size", type=int, default=None,
                   help="pixels fed to the network (default: the backbone's, 224; hed_stats 64)")
    g.add_argument("--standardize", type=int, default=0, metavar="N",
                   help="standardise every feature with its mean and std on N patches of the slides (recorded in "
                        "features_meta.json; hed_stats' descriptors differ in scale by orders of magnitude)")


def _extract_params(args):
    from .features import ExtractParams

    return ExtractParams(backbone=args.backbone or "resnet50_trunc", weights=args.weights,
                         random_weights=args.random_weights, batch_size=args.batch_size,
                         num_workers=args.num_workers, device=args.device, input_size=args.input_size,
                         calibrate_bn=args.calibrate_bn, standardize=args.standardize,
                         skip_existing=not getattr(args, "no_skip", False),
                         tile=_tile_params(args))


def _extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slides", required=True, metavar="DIR")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="writes pt_files/<slide>.pt, h5_files/<slide>.h5, features_meta.json, extract_summary.csv")
    parser.add_argument("--coords", default=None, metavar="DIR",
                        help="the output folder of `tile` (its patches/); default: tile first into OUT/patches")
    parser.add_argument("--no-skip", action="store_true", help="extract again even when a slide's outputs exist")
    _add_extractor_arguments(parser)
    _add_tile_arguments(parser)


def _extract_run(args) -> int:
    from .features import extract_slides

    results = extract_slides(args.slides, args.out, _extract_params(args), coords_dir=args.coords)
    return 1 if results and all(r.status == "failed" for r in results) else 0


# --------------------------------------------------------------------------------------------------
# train (one fold or k folds)

def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, metavar="RECIPE.yaml", help="the recipe (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. train.optimizer.lr=1e-4 data.fold=3")
    parser.add_argument("--run-dir", default=None, help="run folder (k-fold: the parent of fold_<k>/)")
    parser.add_argument("--resume", action="store_true", help="continue the run(s) in --run-dir")
    parser.add_argument("--folds", default=None, metavar="all|K,K,...",
                        help="train these folds in turn and write summary.csv / summary.md (mean ± std); "
                             "default: data.folds from the recipe, else data.fold alone")


def _parse_folds(spec: str | None, config) -> list[int] | None:
    from .data import list_split_files

    if spec is None:
        return config.data.folds
    if spec == "all":
        if config.data.split_dir is None:
            raise ValueError("--folds all needs data.split_dir (a folder of splits_{k}.csv)")
        return list(list_split_files(config.data.split_dir))
    try:
        return [int(k) for k in spec.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--folds must be 'all' or comma-separated integers, got {spec!r}") from None


def _train_run(args) -> int:
    import os

    from mambakit.engine.config import load_config
    from mambakit.engine.runner import _print_result
    from mambakit.engine.trainer import Trainer

    config = load_config(MILRecipe, args.config, args.overrides)
    folds = _parse_folds(args.folds, config)
    hint = f"pathology-{Path(args.config).stem}"

    def fit(cfg, run_dir):
        result = Trainer(_task(cfg)).fit(run_dir, resume=args.resume and run_dir is not None and Path(run_dir).exists(),
                                         name_hint=hint)
        _print_result(result, "run folder")
        return result

    if not folds or len(folds) == 1:
        if folds:
            config.data.fold = folds[0]
        fit(config, args.run_dir)
        return 0
    from .task import run_folds

    _, markdown = run_folds(config, folds, args.run_dir, fit, name_hint=hint)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\n{len(folds)}-fold summary\n{markdown}")
    return 0


# --------------------------------------------------------------------------------------------------
# heatmap

def _heatmap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT|RUN_DIR")
    parser.add_argument("--slide", required=True, metavar="SLIDE", help="the slide file")
    parser.add_argument("--features", default=None, metavar="DIR|FILE.h5",
                        help="features with coords: an extract output folder (h5_files/<slide>.h5) or the .h5 "
                             "itself; default: the recipe's data.features, else tile and extract now")
    parser.add_argument("--out", default="heatmap.png", metavar="FILE.png")
    parser.add_argument("--normalize", default="percentile", choices=["percentile", "minmax", "none"])
    parser.add_argument("--max-size", type=int, default=1024, help="thumbnail's longest side")
    parser.add_argument("--cohort", default=None, metavar="DIR", help="outline the planted regions of a cohort slide")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument("--extractor-meta", default=None, metavar="features_meta.json",
                        help="without --features: the training features' extractor record (default: the run's "
                             "copy, else the recipe's data.features/features_meta.json); the slide is extracted "
                             "with exactly those settings, and extractor options that differ are refused")
    _add_extractor_arguments(parser)
    _add_tile_arguments(parser)


def _heatmap_run(args) -> int:
    import tempfile

    from .data import Bag
    from .inference import heatmap_for_bag, model_from_checkpoint
    from .wsi import slide_id_of

    model, recipe, classes = model_from_checkpoint(args.checkpoint, use_ema=args.ema)
    slide = Path(args.slide)
    sid = slide_id_of(slide)
    h5 = _locate_features(args, recipe, sid)
    if h5 is None:
        from .features import extract_slides

        extractor = _training_extractor(args, recipe)
        tmp = Path(tempfile.mkdtemp(prefix="mambakit-heatmap-"))
        results = extract_slides([slide], tmp, _extract_params(args), progress=True, extractor=extractor)
        if results[0].status == "failed":
            raise ValueError(f"{sid}: {results[0].error}")
        h5 = tmp / "h5_files" / f"{sid}.h5"
    regions = None
    if args.cohort:
        from .cohort import load_manifest

        regions = {s["slide_id"]: s["regions"] for s in load_manifest(args.cohort)["slides"]}
    bag = Bag(sid, [sid], [h5], -1)
    written = heatmap_for_bag(model, bag, slide.parent, args.out, classes=classes,
                              survival=recipe.data.task == "survival", normalize=args.normalize,
                              max_size=args.max_size, regions=regions)
    for p in written:
        print(f"heatmap: {p}")
    return 0


def _training_extractor(args, recipe):
    """The extractor of the features the model was trained on (features_meta.json), so that the new slide's
    features are comparable; extractor options given on the command line must agree with it."""
    import json

    from .features import extractor_from_meta, requested_differences
    from .inference import training_features_meta

    if args.extractor_meta:
        where = Path(args.extractor_meta)
        if not where.is_file():
            raise FileNotFoundError(f"--extractor-meta {where} does not exist")
        meta = json.loads(where.read_text())
    else:
        meta, places = training_features_meta(args.checkpoint, recipe)
        if meta is None:
            raise ValueError(f"cannot tell which extractor made the training features: no features_meta.json in "
                             f"{' or '.join(map(str, places))}. Pass --extractor-meta FILE, or extract the slide with "
                             f"the training extractor and pass --features")
        where = next(p for p in places if p.is_file())
    diff = requested_differences(meta, args.backbone, args.weights, args.random_weights, args.input_size)
    if args.calibrate_bn or args.standardize:
        diff.append("--calibrate-bn / --standardize: a heatmap reuses the training extractor's statistics")
    if diff:
        raise ValueError(f"the model was trained on features of another extractor ({where}): {'; '.join(diff)}. "
                         f"Drop these options: the slide is extracted with the training settings")
    extractor = extractor_from_meta(meta, str(where))
    print(f"heatmap: extracting {args.slide} with the training extractor ({meta['backbone']}, input "
          f"{meta['input_size']} px, weights {meta['weights']}; from {where})")
    return extractor


def _locate_features(args, recipe, sid: str) -> Path | None:
    if args.features:
        p = Path(args.features)
        if p.suffix == ".h5":
            if not p.is_file():
                raise FileNotFoundError(f"--features {p} does not exist")
            return p
        candidate = p / "h5_files" / f"{sid}.h5"
        if not candidate.is_file():
            raise FileNotFoundError(f"--features {p}: no h5_files/{sid}.h5 (features with coordinates)")
        return candidate
    if recipe.data.features:
        candidate = Path(recipe.data.features) / "h5_files" / f"{sid}.h5"
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------------
# cohort / convert

def _cohort_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--quick", action="store_true", help="the small cohort of the quickstart (cohort.QUICK)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-slides", type=int, default=None)
    parser.add_argument("--sources", default=None, metavar="DIR",
                        help="a folder with cmu_small_region.svs, target_image.png, ihc.png (default: fetched)")
    parser.add_argument("--run", action="store_true",
                        help="then run the whole pipeline: tile, extract (--backbone), train MambaMIL, ABMIL, "
                             "TransMIL, mean-pooling MIL, evaluate, heatmaps; writes OUT/report.md")
    parser.add_argument("--backbone", default="hed_stats", choices=["hed_stats", "resnet50_trunc"],
                        help="extractor with --run: hed_stats (weight-free stain deconvolution with colour and "
                             "texture statistics; default) or resnet50_trunc with random weights")
    parser.add_argument("--input-size", type=int, default=None,
                        help="extractor input pixels with --run (default: the backbone's: hed_stats 64, resnet 224)")


def _cohort_run(args) -> int:
    from dataclasses import replace

    from .cohort import FULL, QUICK, build_cohort
    from .pipeline import CohortRun, format_report, run_cohort_pipeline

    spec = QUICK if args.quick else FULL
    spec = replace(spec, seed=args.seed, **({"n_slides": args.n_slides} if args.n_slides else {}))
    if not args.run:
        build_cohort(Path(args.out), spec, sources=args.sources)
        return 0
    if args.n_slides:
        raise ValueError("--n-slides applies to building only; --run uses the full or --quick cohort")
    recipes = QUICK_RECIPES if args.quick else COHORT_RECIPES
    report = run_cohort_pipeline(CohortRun(out_dir=args.out, recipes=[str(r) for r in recipes],
                                           spec="quick" if args.quick else "full", seed=args.seed,
                                           backbone=args.backbone, input_size=args.input_size,
                                           sources=args.sources))
    print(format_report(report))
    return 0


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE.pt", help="MambaMIL's s_<k>_checkpoint.pt")
    parser.add_argument("--model", default="mamba_mil", choices=["mamba_mil", "mean_mil", "max_mil", "att_mil", "trans_mil"])
    parser.add_argument("--mixer", default=None, choices=["SRMamba", "BiMamba", "Mamba"],
                        help="mamba_mil: required, upstream's --mambamil_type (the state dict cannot tell SRMamba "
                             "from BiMamba, and upstream does not record it)")
    parser.add_argument("--rate", type=int, default=None,
                        help="mamba_mil with SRMamba: required, upstream's --mambamil_rate (main.py's default is 10, "
                             "its scripts pass 5)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--out", required=True, metavar="FILE.pt",
                        help="a mambakit pretrained file (mambakit.zoo.load_pretrained, finetune --pretrained)")


def _convert_run(args) -> int:
    from mambakit.zoo import save_pretrained

    from .convert import load_upstream_checkpoint

    kwargs = {"dropout": args.dropout}
    if args.model == "mamba_mil":
        kwargs.update(mixer=args.mixer, rate=args.rate)
    elif args.mixer is not None or args.rate is not None:
        raise ValueError(f"--mixer / --rate apply to --model mamba_mil only, not {args.model}")
    model, config = load_upstream_checkpoint(args.checkpoint, args.model, **kwargs)
    path = save_pretrained(model, args.out, builder="mambakit.apps.pathology.models:build_mil_model", config=config,
                           source=str(args.checkpoint))
    used = ", ".join(f"{k}={config[k]}" for k in ("mixer", "rate", "layer", "dim", "in_dim", "n_classes", "dropout")
                     if k in config and not (k == "rate" and config.get("mixer") != "SRMamba"))
    print(f"converted {args.checkpoint} ({config['name']}: {used}; {sum(p.numel() for p in model.parameters()):,} "
          f"parameters) -> {path}")
    return 0


# --------------------------------------------------------------------------------------------------
# quickstart

def quickstart(out_dir: str | Path | None = None) -> QuickstartResult:
    """The quick cohort, weight-free stain / texture features (hed_stats), MambaMIL vs mean-pooling MIL."""
    from .config import MODEL_TITLES
    from .pipeline import CohortRun, format_report, run_cohort_pipeline

    started = time.time()
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"pathology-quick-{time.strftime('%Y%m%d-%H%M%S')}"
    report = run_cohort_pipeline(CohortRun(out_dir=str(out), recipes=[str(r) for r in QUICK_RECIPES], spec="quick",
                                           heatmaps=2), progress=False)
    print(format_report(report))
    mamba, base = (report["models"][Path(r).stem] for r in QUICK_RECIPES)
    return QuickstartResult(
        app="pathology", model=MODEL_TITLES["mamba_mil"],
        data=f"embedded WSI cohort ({report['cohort']['slides']} slides, {report['cohort']['patches']} patches; "
             f"weight-free stain deconvolution + colour / texture features)",
        metric="test AUC", value=float(mamba["test"]["auc"]), baseline=MODEL_TITLES["mean_mil"],
        baseline_value=float(base["test"]["auc"]), wall_time_s=time.time() - started, run_dir=str(out))


# --------------------------------------------------------------------------------------------------
# mambakit.zoo.load_pretrained(RUN_DIR)

def _rebuild_model(config: dict, weights, source: str):
    from .inference import rebuild_mil_model         # imported here: app.py stays cheap to import

    return rebuild_mil_model(config, weights, source)


# --------------------------------------------------------------------------------------------------

def _datasets():
    from .cohort import sources_dataset

    return [sources_dataset()]


def _weights():
    from .weights import zoo_weights

    return zoo_weights()


APP = App(
    name="pathology",
    description="whole-slide images: OpenSlide tiling, feature extraction, MambaMIL / ABMIL / TransMIL "
                "subtyping and survival, attention heatmaps",
    verbs=[
        Verb("tile", "segment tissue and save CLAM-style patch coordinates (patches/<slide>.h5) with QC thumbnails",
             _tile_arguments, _tile_run),
        Verb("extract", "extract patch features (pt_files/, h5_files/) with resnet50_trunc or a timm model; "
                        "resumable, sharded over torchrun ranks", _extract_arguments, _extract_run),
        Verb("train", "train a MIL recipe (one fold, or k folds with a mean ± std summary)",
             _train_arguments, _train_run),
        eval_verb("pathology", MILRecipe, _task),
        finetune_verb("pathology", MILRecipe, _task),
        Verb("heatmap", "draw a checkpoint's per-patch attention over a slide thumbnail (PNG)",
             _heatmap_arguments, _heatmap_run),
        Verb("cohort", "build the embedded WSI cohort from real slides on the package index (--run: the whole "
                       "pipeline)", _cohort_arguments, _cohort_run),
        Verb("convert", "convert a MambaMIL-repository checkpoint (s_<k>_checkpoint.pt) to a mambakit file",
             _convert_arguments, _convert_run),
    ],
    quickstart=quickstart,
    datasets=_datasets(),
    weights=_weights(),
    rebuild_model=_rebuild_model,
)
