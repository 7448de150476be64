"""The verbs every app shares -- `train`, `eval`, `finetune` -- built from the app's recipe schema and Task.

In an app's `app.py`:

    from mambakit.engine.app import App
    from mambakit.engine.runner import standard_verbs

    def _task(config):                       # imported lazily, so `mambakit --help` stays fast
        from .tasks import ForecastTask
        return ForecastTask(config)

    APP = App(name="timeseries", description="...",
              verbs=[*standard_verbs("timeseries", ForecastRecipe, _task), forecast_verb])

Command lines (each also runs under `torchrun --nproc_per_node=K -m mambakit ...`):

    train    -c RECIPE.yaml [key.sub=value ...] [--run-dir DIR] [--resume]
    eval     --checkpoint CKPT|RUN_DIR [-c RECIPE.yaml] [key.sub=value ...] [--split test] [--ema]
    finetune --pretrained NAME|PATH -c RECIPE.yaml [key.sub=value ...] [--run-dir DIR] [--resume]

`eval` rebuilds the model from the config saved in the checkpoint unless -c is given (overrides apply to
either). A run folder given to --checkpoint means its best checkpoint (else its latest).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

from .app import Verb
from .config import ConfigError, apply_overrides, from_dict, load_config
from .logs import format_size

__all__ = ["standard_verbs", "train_verb", "eval_verb", "finetune_verb", "format_table", "add_config_arguments",
           "load_recipe", "saved_recipe", "add_eval_arguments"]

TaskFactory = Callable[[Any], Any]


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def format_table(rows: list[tuple[str, str]], header: tuple[str, str] = ("metric", "value")) -> str:
    width = max(len(r[0]) for r in [header, *rows])
    lines = [f"{header[0]:<{width}}  {header[1]}", f"{'-' * width}  {'-' * max(len(header[1]), 5)}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _metric_rows(metrics: dict[str, float]) -> list[tuple[str, str]]:
    return [(key, f"{value:.6g}" if isinstance(value, float) else str(value)) for key, value in metrics.items()]


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool, default: str | None,
                          app: str | None = None) -> None:
    def recipe(spec: str) -> str:
        # Resolved while parsing, so a wrong name fails before anything starts, with the app's close matches.
        from .recipes import resolve_recipe
        try:
            return str(resolve_recipe(spec, app))
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    listing = f" (`mambakit {app} recipes` lists them)" if app else ""
    parser.add_argument("-c", "--config", required=required and default is None, default=default, type=recipe,
                        metavar="RECIPE", help=f"a recipe name{listing} or a YAML file"
                                           + (f"; default {default}" if default else ""))
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. train.optimizer.lr=3e-4 train.epochs=5")


#: For an app's own verbs: `-c RECIPE` (a packaged recipe name of `app` or a YAML path) and the overrides.
add_config_arguments = _add_config_arguments


def _load(recipe: type, args: argparse.Namespace) -> Any:
    return load_config(recipe, args.config, args.overrides)


def _print_result(result, title: str) -> None:
    if not _is_main():
        return
    print(f"\n{title}: {result.run_dir}")
    if result.best_metric is not None:
        print(f"best {result.best_metric} = {result.best_value:.6g} at epoch {result.best_epoch}"
              + (" (stopped early)" if result.stopped_early else ""))
    if result.metrics:
        print(format_table(_metric_rows(result.metrics)))


def train_verb(app: str, recipe: type, task_factory: TaskFactory, default_recipe: str | None = None) -> Verb:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _add_config_arguments(parser, required=True, default=default_recipe, app=app)
        parser.add_argument("--run-dir", default=None, help="run folder (default: run.out_dir/<app>-<recipe>-<time>)")
        parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last "
                                                                   "good checkpoint")

    def run(args: argparse.Namespace) -> int:
        from .trainer import Trainer
        config = _load(recipe, args)
        result = Trainer(task_factory(config)).fit(args.run_dir, resume=args.resume,
                                                   name_hint=f"{app}-{Path(args.config).stem}")
        _print_result(result, "run folder")
        return 0

    return Verb("train", f"train a {app} model from a recipe (torchrun for several processes)", add_arguments, run)


def finetune_verb(app: str, recipe: type, task_factory: TaskFactory, default_recipe: str | None = None) -> Verb:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pretrained", required=True, metavar="NAME|PATH",
                            help="zoo weights name, checkpoint, run folder or state-dict file")
        _add_config_arguments(parser, required=True, default=default_recipe, app=app)
        parser.add_argument("--run-dir", default=None)
        parser.add_argument("--resume", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from .trainer import Trainer
        config = _load(recipe, args)
        result = Trainer(task_factory(config), pretrained=args.pretrained).fit(
            args.run_dir, resume=args.resume, name_hint=f"{app}-{Path(args.config).stem}-ft")
        _print_result(result, "run folder")
        return 0

    return Verb("finetune", f"fine-tune pretrained weights on a {app} recipe (heads of another shape are "
                            "re-initialised)", add_arguments, run)


def add_eval_arguments(parser: argparse.ArgumentParser, app: str | None = None) -> None:
    """The arguments every app's `eval` takes: --checkpoint, -c / overrides, --split, --ema, --output."""
    parser.add_argument("--checkpoint", required=True, metavar="CKPT|RUN_DIR",
                        help="checkpoint file, or a run folder (its best checkpoint, else its latest)")
    _add_config_arguments(parser, required=False, default=None, app=app)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--output", default=None, metavar="FILE.json", help="also write the metrics here")


def eval_verb(app: str, recipe: type, task_factory: TaskFactory) -> Verb:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_eval_arguments(parser, app)

    def run(args: argparse.Namespace) -> int:
        from .checkpoint import resolve_checkpoint
        from .trainer import evaluate
        path = resolve_checkpoint(args.checkpoint, prefer="best")
        config = _load(recipe, args) if args.config else saved_recipe(recipe, path, args.overrides)
        metrics = evaluate(task_factory(config), path, split=args.split, use_ema=args.ema)
        if _is_main():
            print(f"\ncheckpoint: {path}")
            print(format_table(_metric_rows(metrics)))
            if args.output:
                output = Path(args.output)
                output.write_text(json.dumps(metrics, indent=1) + "\n")
                print(f"wrote {output} ({format_size(output.stat().st_size)})")
        return 0

    return Verb("eval", f"evaluate a {app} checkpoint on a split", add_arguments, run)


def standard_verbs(app: str, recipe: type, task_factory: TaskFactory, *,
                   default_recipe: str | None = None) -> list[Verb]:
    """`train`, `eval` and `finetune` for an app. `recipe`: the app's recipe dataclass (with `train` and
    `run` sections); `task_factory(config) -> Task`."""
    return [train_verb(app, recipe, task_factory, default_recipe),
            eval_verb(app, recipe, task_factory),
            finetune_verb(app, recipe, task_factory, default_recipe)]


def load_recipe(schema: type, path, app: str, overrides=(), sets: dict | None = None) -> Any:
    """A recipe file or packaged name (`resolve_recipe`), then `sets` (dotted key -> value, set as given, not
    parsed: paths from the command line), then the CLI overrides, validated into `schema`."""
    import yaml

    from .recipes import resolve_recipe

    path = resolve_recipe(path, app)
    data = yaml.safe_load(path.read_text()) or {}
    for key, value in (sets or {}).items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[last] = value
    return from_dict(schema, apply_overrides(data, overrides), str(path))


def saved_recipe(schema: type, checkpoint, overrides=()) -> Any:
    """The recipe saved in a training checkpoint, with the CLI overrides applied."""
    from .checkpoint import load_checkpoint

    saved = load_checkpoint(checkpoint).get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{checkpoint} holds no saved config; pass the recipe with -c")
    return from_dict(schema, apply_overrides(saved, overrides), f"{checkpoint} (saved config)")
