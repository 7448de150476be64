"""`mambakit pointcloud ...`: train, evaluate, fine-tune and run point-cloud classifiers and part segmenters
(Point Cloud Mamba, PointNet++, Point Transformer, DGCNN).

    mambakit pointcloud train -c pcm_tiny_cgal [train.epochs=20 ...]
    mambakit pointcloud eval --checkpoint runs/<run> [--split test]       OA, mAcc, per class, confusion PNG
    mambakit pointcloud finetune --pretrained runs/<run>|PCM.pth --data my_meshes/ [-c RECIPE] [k=v ...]
    mambakit pointcloud predict scan.ply meshes/ --checkpoint runs/<run> [--out DIR]
    mambakit pointcloud render bunny.off --by order --orders xyz,hilbert,z --out bunny.png
    mambakit quickstart pointcloud                   PCM-Tiny vs PointNet++ on the embedded CGAL part segmentation

Kept cheap to import (`mambakit --help` loads every app): torch and the models load inside the verbs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mambakit.engine.app import App, QuickstartResult, Verb
from mambakit.engine.runner import add_eval_arguments, format_table, load_recipe, saved_recipe, train_verb

from .config import PointCloudRecipe
from .datasets import DATASETS

__all__ = ["APP", "quickstart", "QUICK_RECIPE", "QUICK_BASELINE_RECIPE", "FINETUNE_RECIPE"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pointcloud"
QUICK_RECIPE = CONFIGS / "quick_pcm_tiny_cgal.yaml"
QUICK_BASELINE_RECIPE = CONFIGS / "quick_pointnet2_cgal.yaml"
FINETUNE_RECIPE = CONFIGS / "finetune_pcm_tiny_folder.yaml"


def _task(config, load_pretrained: bool = True):
    from .task import PointCloudTask

    return PointCloudTask(config, load_pretrained=load_pretrained)


def _load_recipe(path, overrides, sets: dict | None = None) -> PointCloudRecipe:
    return load_recipe(PointCloudRecipe, path, "pointcloud", overrides, sets)


# --------------------------------------------------------------------------------------------------
# eval

def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_eval_arguments(parser, "pointcloud")
    parser.add_argument("--plot-dir", default=None, metavar="DIR",
                        help="confusion matrix and renders go here (default: the run folder)")


def _eval_run(args: argparse.Namespace) -> int:
    from mambakit.engine.checkpoint import resolve_checkpoint, run_dir_of
    from mambakit.engine.trainer import evaluate

    from .inference import render_evaluated

    path = resolve_checkpoint(args.checkpoint, prefer="best")
    config = (_load_recipe(args.config, args.overrides) if args.config
              else saved_recipe(PointCloudRecipe, path, args.overrides))
    task = _task(config, load_pretrained=False)
    metrics = evaluate(task, path, split=args.split, use_ema=args.ema)
    print(f"\ncheckpoint: {path}")
    print(format_table([(k, f"{v:.6g}") for k, v in metrics.items()]))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=1) + "\n")
    out_dir = Path(args.plot_dir) if args.plot_dir else run_dir_of(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"{args.split}{'_ema' if args.ema else ''}"
    if config.eval.confusion_matrix and args.split in task.confusion:
        print(f"confusion matrix: {task.write_confusion(args.split, out_dir / f'confusion_{suffix}.png')}")
    for written in render_evaluated(task, path, args.split, out_dir, use_ema=args.ema):
        print(f"render: {written}")
    return 0


# --------------------------------------------------------------------------------------------------
# finetune

def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, metavar="RUN|CKPT|PCM.pth",
                        help="a mambakit point-cloud run or checkpoint, or an upstream Point Cloud Mamba checkpoint")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a folder of meshes / point files, one subfolder per class (optionally under "
                             "train/ and test/)")
    parser.add_argument("-c", "--config", default=str(FINETUNE_RECIPE), metavar="RECIPE.yaml",
                        help=f"the recipe (default {FINETUNE_RECIPE.name})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe values")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--resume", action="store_true")


def _finetune_run(args: argparse.Namespace) -> int:
    from mambakit.engine.runner import _print_result
    from mambakit.engine.trainer import Trainer

    sets = {"model.pretrained": str(args.pretrained)}
    if args.data is not None:
        sets.update({"data.source": "folder", "data.root": str(args.data)})
    config = _load_recipe(args.config, args.overrides, sets)
    result = Trainer(_task(config)).fit(args.run_dir, resume=args.resume,
                                        name_hint=f"pointcloud-{Path(args.config).stem}-ft")
    _print_result(result, "run folder")
    return 0


# --------------------------------------------------------------------------------------------------
# predict

def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE|DIR",
                        help="meshes (.off .ply .obj .stl) or point files (.xyz .txt .npy), or folders of them; "
                             "a file that cannot be read is reported and the others are still predicted")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT|RUN_DIR", help="a point-cloud run or checkpoint")
    parser.add_argument("--category", default=None,
                        help="part segmentation: the shape category of every input (name or index)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="part segmentation: write each cloud with its predicted parts as a coloured .ply here")
    parser.add_argument("--topk", type=int, default=3, help="classification: labels per input (default 3)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _predict_run(args: argparse.Namespace) -> int:
    from .inference import format_predictions, predict

    results = predict(args.inputs, args.checkpoint, topk=args.topk, category=args.category, out_dir=args.out,
                      use_ema=args.ema)
    print(json.dumps(results, indent=1) if args.json else format_predictions(results))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"mambakit: error: {r['error']}", file=sys.stderr)
    if failed:
        print(f"mambakit: pointcloud predict: {len(failed)} of {len(results)} inputs could not be read (listed "
              f"above); the other {len(results) - len(failed)} were predicted", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# render

def _render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="FILE", help="a mesh or point file (sampled to --points points)")
    parser.add_argument("--by", default="order", choices=["order", "prediction", "height"],
                        help="colour by position in serialization orders (default), by the model's predicted "
                             "parts (needs --checkpoint of a part-segmentation run), or by height")
    parser.add_argument("--orders", default="xyz,hilbert,z", help="orders drawn side by side with --by order")
    parser.add_argument("--checkpoint", default=None, metavar="CKPT|RUN_DIR")
    parser.add_argument("--category", default=None, help="part segmentation: the input's shape category")
    parser.add_argument("--points", type=int, default=2048, help="points sampled from a mesh (default 2048)")
    parser.add_argument("--grid-size", type=float, default=0.02,
                        help="serialization grid cell on the unit-sphere-normalised cloud (default 0.02, PCM's)")
    parser.add_argument("--out", required=True, metavar="FILE.png")


def _render_run(args: argparse.Namespace) -> int:
    from .inference import render_file

    print(f"render: {render_file(args.input, args.out, by=args.by, orders=args.orders.split(','), checkpoint=args.checkpoint, category=args.category, n_points=args.points, grid_size=args.grid_size)}")
    return 0


# --------------------------------------------------------------------------------------------------
# quickstart

def quickstart(out_dir: str | Path | None = None, recipe_path: str | Path = QUICK_RECIPE,
               baseline_path: str | Path = QUICK_BASELINE_RECIPE, overrides=()) -> QuickstartResult:
    """Train a small PCM-Tiny (quick recipe) and PointNet++ (SSG) on the embedded CGAL meshes' part
    segmentation, the baseline with the same data, augmentation and CPU time, and compare their test
    instance mIoU (test overall accuracy when the recipes are classification ones)."""
    from mambakit.engine.config import load_config
    from mambakit.engine.trainer import Trainer

    from .task import MODEL_TITLES

    started = time.time()
    runs = {}
    for key, path in (("model", recipe_path), ("baseline", baseline_path)):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the quick recipe is missing (it ships in the package, mambakit/configs/)")
        config = load_config(PointCloudRecipe, path, list(overrides))
        run_dir = Path(out_dir) / f"{key}-{config.model.name}" if out_dir is not None else None
        result = Trainer(_task(config)).fit(run_dir, name_hint=f"pointcloud-quick-{config.model.name}")
        runs[key] = (config, result)
    (config, result), (base_config, base_result) = runs["model"], runs["baseline"]
    seg = config.model.task == "seg"
    metric = "test/instance_miou" if seg else "test/oa"
    value, base = float(result.metrics[metric]), float(base_result.metrics[metric])
    title, base_title = MODEL_TITLES[config.model.name], MODEL_TITLES[base_config.model.name]
    print(f"pointcloud quickstart: {metric} {value:.4f} ({title}) vs {base:.4f} ({base_title})")
    return QuickstartResult(
        app="pointcloud", model=f"{title} (small) from scratch",
        data=f"CGAL demo meshes (Debian libcgal-demo), {'part segmentation' if seg else 'classes'}, split by mesh",
        metric="test instance mIoU" if seg else "test overall accuracy", value=value,
        baseline=f"{base_title}, same data and CPU time", baseline_value=base,
        wall_time_s=time.time() - started, run_dir=str(result.run_dir))


# --------------------------------------------------------------------------------------------------
# mambakit.zoo.load_pretrained(RUN_DIR)

def _rebuild_model(config: dict, weights, source: str):
    from .inference import rebuild_model

    return rebuild_model(config, weights, source)


APP = App(
    name="pointcloud",
    description="point clouds: Point Cloud Mamba classification and part segmentation with serialized scans, "
                "against PointNet++, Point Transformer and DGCNN; ModelNet40, ScanObjectNN, ShapeNetPart, meshes",
    verbs=[train_verb("pointcloud", PointCloudRecipe, _task),
           Verb("eval", "evaluate a point-cloud checkpoint on a split (OA, mAcc, per class, confusion PNG; mIoU "
                        "for part segmentation; renders)", _eval_arguments, _eval_run),
           Verb("finetune", "fine-tune a run or an upstream PCM checkpoint on a folder of meshes / point files; "
                            "the head is replaced for the new classes", _finetune_arguments, _finetune_run),
           Verb("predict", "class and probability per mesh / point file, or per-point parts as a coloured .ply",
                _predict_arguments, _predict_run),
           Verb("render", "a PNG of a cloud coloured by serialization order, predicted parts or height",
                _render_arguments, _render_run)],
    quickstart=quickstart,
    datasets=DATASETS,
    rebuild_model=_rebuild_model,
)
