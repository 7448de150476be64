"""`mambakit timeseries ...`: train / eval / finetune a forecaster from a recipe, forecast a CSV, quickstart.

    mambakit timeseries train -c configs/timeseries/smamba_etth1_96.yaml data.path=ETTh1.csv
    mambakit timeseries eval --checkpoint runs/<run> [--split test] [--plot test.png]
    mambakit timeseries finetune --pretrained runs/<run> -c configs/timeseries/<recipe>.yaml
    mambakit timeseries forecast --checkpoint runs/<run> --csv my.csv [--horizon H] [--columns A,B]
                                 [--holdout H] --out forecast.csv --plot forecast.png

Kept cheap to import (`mambakit --help` loads it): torch and pandas are imported inside the verbs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mambakit.engine.app import App, QuickstartResult, Verb
from mambakit.engine.runner import eval_verb, finetune_verb, train_verb

from .config import ForecastRecipe
from .datasets import DATASETS

__all__ = ["APP", "QUICK_RECIPE", "quickstart"]

QUICK_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "timeseries" / "quick_elecdemand.yaml"


def _task(config):
    from .task import ForecastTask

    return ForecastTask(config)


# --------------------------------------------------------------------------------------------------
# eval, with the test-set forecast plot

def _eval_with_plot() -> Verb:
    base = eval_verb("timeseries", ForecastRecipe, _task)

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        base.add_arguments(parser)
        parser.add_argument("--plot", default=None, metavar="FILE.png",
                            help="forecast plot of evenly spaced windows of the split (default: "
                                 "<run>/eval_<split>_forecast.png beside the checkpoint's run folder)")

    def run(args: argparse.Namespace) -> int:
        code = base.run(args)
        _plot_after_eval(args)
        return code

    return Verb("eval", base.help + "; also plots forecasts of that split", add_arguments, run)


def _plot_after_eval(args: argparse.Namespace) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint, run_dir_of
    from mambakit.engine.config import apply_overrides, from_dict, load_config
    from mambakit.engine.trainer import load_model_state

    from .task import plot_test_forecasts

    path = resolve_checkpoint(args.checkpoint, prefer="best")
    state = load_checkpoint(path)
    if args.config:
        config = load_config(ForecastRecipe, args.config, args.overrides)
    else:
        config = from_dict(ForecastRecipe, apply_overrides(state["config"], args.overrides), f"{path} (saved config)")
    task = _task(config)
    model = task.build_model()
    load_model_state(model, state["ema" if args.ema else "model"], str(path))
    split = getattr(args, "split", "test")
    task.splits.test = getattr(task.splits, split)      # plot the evaluated split
    out = Path(args.plot) if args.plot else run_dir_of(path) / f"eval_{split}_forecast.png"
    plot_test_forecasts(task, model, out, count=max(config.eval.plot_windows, 1))
    print(f"forecast plot: {out}")


def _standard_verbs() -> list[Verb]:
    return [train_verb("timeseries", ForecastRecipe, _task), _eval_with_plot(),
            finetune_verb("timeseries", ForecastRecipe, _task)]


# --------------------------------------------------------------------------------------------------
# forecast

def _forecast_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT|RUN_DIR",
                        help="a training checkpoint, or a run folder (its best checkpoint)")
    parser.add_argument("--csv", required=True, metavar="FILE.csv",
                        help="the series to continue: the model's columns and its date column, same frequency")
    parser.add_argument("--horizon", type=int, default=None,
                        help="steps to forecast (default: the model's horizon; longer ones are rolled out)")
    parser.add_argument("--columns", default=None, metavar="A,B",
                        help="forecast columns to write and plot (default: all; the plot shows the last 4)")
    parser.add_argument("--holdout", type=int, default=0, metavar="H",
                        help="hide the last H rows, forecast from before them and score / plot them as truth")
    parser.add_argument("--out", default=None, metavar="FORECAST.csv", help="write the dated forecast here")
    parser.add_argument("--plot", default=None, metavar="FORECAST.png", help="plot history, forecast and truth")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def _forecast_run(args: argparse.Namespace) -> int:
    from .forecast import run_forecast

    if args.out is None and args.plot is None:
        raise ValueError("give --out FORECAST.csv and/or --plot FORECAST.png: nothing would be written")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    run_forecast(args.checkpoint, args.csv, args.out, args.plot, horizon=args.horizon, holdout=args.holdout,
                 columns=columns, device=args.device)
    return 0


FORECAST_VERB = Verb("forecast", "forecast beyond the end of a CSV with a trained checkpoint; writes dated rows "
                                 "and a plot", _forecast_arguments, _forecast_run)
# Every app has `predict`; for forecasting it is `forecast`.
PREDICT_VERB = Verb("predict", "the same as forecast", _forecast_arguments, _forecast_run)


# --------------------------------------------------------------------------------------------------
# mambakit.zoo.load_pretrained(RUN_DIR)

def _rebuild_model(config: dict, weights, source: str):
    from .forecast import rebuild_forecaster        # imported here: app.py stays cheap to import

    return rebuild_forecaster(config, weights, source)


# --------------------------------------------------------------------------------------------------
# quickstart

def quickstart(recipe_path: str | Path = QUICK_RECIPE, overrides=(), run_dir: str | Path | None = None
               ) -> QuickstartResult:
    """Train S-Mamba on the embedded elecdemand series (quick recipe) and compare its test MSE with the
    seasonal-naive forecast that repeats the last day."""
    from mambakit.engine.config import load_config
    from mambakit.engine.trainer import Trainer

    from .task import MODEL_TITLES

    started = time.time()
    path = Path(recipe_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the quick recipe is missing (it ships in the package, mambakit/configs/)")
    config = load_config(ForecastRecipe, path, list(overrides))
    if config.eval.seasonal_period is None:
        raise ValueError(f"{path}: eval.seasonal_period must be set (the baseline the quickstart reports)")
    result = Trainer(_task(config)).fit(run_dir, name_hint="timeseries-quick")
    m = result.metrics
    period = config.eval.seasonal_period
    print(f"timeseries quickstart: test MSE {m['test/mse']:.4f} / MAE {m['test/mae']:.4f} "
          f"vs seasonal naive MSE {m['test/naive_mse']:.4f} / MAE {m['test/naive_mae']:.4f}")
    return QuickstartResult(
        app="timeseries", model=MODEL_TITLES.get(config.model.name, config.model.name),
        data=f"elecdemand (Victoria 2014, 30 min), {config.data.features} -> {config.data.target}, "
             f"{config.data.seq_len} -> {config.data.pred_len}",
        metric="test MSE (scaled)", value=float(m["test/mse"]),
        baseline=f"seasonal naive (repeat the last {period} steps)", baseline_value=float(m["test/naive_mse"]),
        wall_time_s=time.time() - started, run_dir=str(result.run_dir))


APP = App(
    name="timeseries",
    description="time-series forecasting: S-Mamba, iTransformer, DLinear on any dated CSV (TSLib protocol)",
    verbs=[*_standard_verbs(), FORECAST_VERB, PREDICT_VERB],
    quickstart=quickstart,
    datasets=DATASETS,
    rebuild_model=_rebuild_model,
)
