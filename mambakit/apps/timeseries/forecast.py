"""`mambakit timeseries forecast`: forecast beyond the end of a CSV with a trained checkpoint.

    mambakit timeseries forecast --checkpoint runs/my-run --csv my.csv --horizon 48 \
        --out forecast.csv --plot forecast.png [--columns A,B] [--holdout 48]

The checkpoint (a file, or a run folder: its best checkpoint) carries the network, the training scaler and
the data description (columns, target, features, frequency), so the CSV only needs the same columns and a
date column at the same frequency. The forecast starts after the last row (or, with --holdout H, after the
row H from the end, and the hidden rows are drawn as the truth and scored). Horizons longer than the model's
are rolled out: the forecast is fed back as input (features M and S only).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .data import DataError, infer_frequency, read_series, time_features
from .models import build_model
from .task import MODEL_TITLES, Forecaster, ForecastRecipe

__all__ = ["ForecastOutput", "load_forecaster", "forecast_csv", "run_forecast"]


@dataclass
class ForecastOutput:
    dates: pd.DatetimeIndex          # the forecast's dates (horizon,)
    columns: list[str]               # the forecast columns
    values: np.ndarray               # (horizon, len(columns)), original scale
    history_dates: pd.DatetimeIndex
    history: np.ndarray              # (rows, len(columns)) the observed part used (original scale)
    truth: np.ndarray | None         # (horizon, len(columns)) the held-out rows, when --holdout was given
    freq: str


def load_forecaster(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[Forecaster, ForecastRecipe]:
    """The model and recipe stored in a training checkpoint (file or run folder; verified on load)."""
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint
    from mambakit.engine.config import from_dict
    from mambakit.engine.trainer import load_model_state

    path = resolve_checkpoint(checkpoint, prefer="best")
    state = load_checkpoint(path)
    if state.get("app") not in (None, "timeseries"):
        raise ValueError(f"{path}: a checkpoint of app {state.get('app')!r}, not a timeseries model")
    source = f"{path} (config)"
    recipe = from_dict(ForecastRecipe, state["config"], source=source)
    model = rebuild_forecaster(state["config"], state["model"], source)
    load_model_state(model, state["model"], str(path))
    return model.to(device).eval(), recipe


def rebuild_forecaster(config: dict, weights, source: str) -> Forecaster:
    """The Forecaster of a training checkpoint's saved recipe, with fresh weights, without the CSV: the number
    of variates, the window lengths and the data description come from the `meta` buffer in the weights.
    (The app's `rebuild_model` hook, behind `zoo.load_pretrained("runs/<x>")`, and `load_forecaster`.)"""
    from mambakit.engine.config import from_dict

    recipe = from_dict(ForecastRecipe, config, source)
    if "meta" not in weights:
        raise ValueError(f"{source}: no data description ('meta' buffer) in the weights; not a timeseries "
                         f"training checkpoint")
    meta = Forecaster.decode_meta(weights["meta"])
    net = build_model(recipe.model, meta["seq_len"], meta["pred_len"], len(meta["columns"]))
    return Forecaster(net, None, meta)


def _same_frequency(a: str, b: str) -> bool:
    to = pd.tseries.frequencies.to_offset
    try:
        return to(a) == to(b)
    except ValueError:
        return a == b


def read_training_way(csv: str | Path, meta: dict):
    """`csv` read exactly as the training file was (date and id columns, columns, target, frequency setting,
    fill), from the run's recorded settings: the user passes the original file, renamed nothing.
    Checkpoints written before these settings were recorded read a wide file with fill none."""
    frame = read_series(csv, date_column=meta["date_column"], columns=meta.get("source_columns", meta["columns"]),
                        target=meta["target"], features=meta["features"], id_column=meta.get("id_column"),
                        freq=meta.get("data_freq"), fill=meta.get("fill", "none"))
    if frame.columns != meta["columns"]:
        absent = [c for c in meta["columns"] if c not in frame.columns]
        if absent:
            raise DataError(f"{frame.source}: the model was trained on {meta['columns']}; this file gives series "
                            f"{', '.join(absent)} (no rows for them in id column '{frame.id_column}')")
        # a long file with more series than the model's: keep the model's, in its order
        keep = [frame.columns.index(c) for c in meta["columns"]]
        frame = dataclasses.replace(frame, values=frame.values[:, keep], columns=list(meta["columns"]))
    if frame.fill_note():
        print(f"note: {frame.fill_note()}", file=sys.stderr, flush=True)
    return frame


def forecast_csv(model: Forecaster, csv: str | Path, horizon: int | None = None, holdout: int = 0,
                 columns: Sequence[str] | None = None) -> ForecastOutput:
    """Forecast `horizon` steps (default: the model's) after the end of `csv` (minus `holdout` rows)."""
    meta = model.info
    seq_len, pred_len, features = meta["seq_len"], meta["pred_len"], meta["features"]
    horizon = pred_len if horizon is None else horizon
    if horizon < 1:
        raise ValueError(f"--horizon must be >= 1, got {horizon}")
    if holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {holdout}")
    frame = read_training_way(csv, meta)
    freq = frame.freq or infer_frequency(frame.dates, frame.source, meta["date_column"])
    if not _same_frequency(freq, meta["freq"]):
        raise DataError(f"{frame.source}: the dates are {freq!r}-spaced but the model was trained on "
                        f"{meta['freq']!r} data")
    if 0 < holdout < horizon:
        raise ValueError(f"--holdout {holdout} hides fewer rows than the horizon {horizon}; use --holdout "
                         f"{horizon} or a shorter --horizon")
    n_obs = len(frame) - holdout
    if n_obs < seq_len:
        raise DataError(f"{frame.source}: {n_obs} rows before the forecast start"
                        f"{f' (after holding out {holdout})' if holdout else ''}, but the model looks back "
                        f"{seq_len} rows")
    if horizon > pred_len and features == "MS":
        raise ValueError(f"--horizon {horizon} is longer than the model's {pred_len}: a features=MS model cannot "
                         f"roll out (its other inputs are not forecast); use --horizon <= {pred_len}")

    values = frame.values[:n_obs]
    predicted = _roll_out(model, values, frame.dates[:n_obs], freq, horizon, meta)
    out_columns = [meta["columns"][-1]] if features == "MS" else list(meta["columns"])
    if features == "MS":
        predicted = predicted[:, -1:]
    history = values[:, -1:] if features == "MS" else values
    truth = None
    if holdout:
        truth = frame.values[n_obs:n_obs + horizon]
        truth = truth[:, -1:] if features == "MS" else truth
    keep = _select_columns(out_columns, columns, frame.source)
    dates = pd.date_range(frame.dates[n_obs - 1], periods=horizon + 1, freq=freq)[1:]
    return ForecastOutput(dates=dates, columns=[out_columns[i] for i in keep], values=predicted[:, keep],
                          history_dates=frame.dates[:n_obs], history=history[:, keep],
                          truth=None if truth is None else truth[:, keep], freq=freq)


def _select_columns(available: list[str], wanted: Sequence[str] | None, source: str) -> list[int]:
    if not wanted:
        return list(range(len(available)))
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(f"--columns: {', '.join(missing)} not among the forecast columns "
                         f"({', '.join(available)}) of the model used on {source}")
    return [available.index(c) for c in wanted]


def _roll_out(model: Forecaster, values: np.ndarray, dates: pd.DatetimeIndex, freq: str, horizon: int,
              meta: dict) -> np.ndarray:
    """Forecasts (horizon, C) in the original scale, feeding each block back as input beyond pred_len."""
    seq_len, pred_len = meta["seq_len"], meta["pred_len"]
    scaler = model.scaler
    device = model.scaler_mean.device
    history = scaler.transform(values[-seq_len:])
    hist_dates = dates[-seq_len:]
    blocks = []
    done = 0
    with torch.no_grad():
        while done < horizon:
            x = torch.as_tensor(history[-seq_len:], dtype=torch.float32, device=device)[None]
            marks = None
            if meta["mark_names"]:
                marks = torch.as_tensor(time_features(hist_dates[-seq_len:], freq), dtype=torch.float32,
                                        device=device)[None]
            block = model(x, marks)[0].double().cpu().numpy()
            blocks.append(block)
            done += pred_len
            if done < horizon:
                history = np.concatenate([history, block])
                step_dates = pd.date_range(hist_dates[-1], periods=pred_len + 1, freq=freq)[1:]
                hist_dates = hist_dates.append(step_dates)
    scaled = np.concatenate(blocks)[:horizon]
    return scaler.inverse_transform(scaled)


def write_forecast(out: ForecastOutput, path: str | Path, date_column: str = "date") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(out.values, columns=out.columns)
    table.insert(0, date_column, out.dates.strftime("%Y-%m-%d %H:%M:%S"))
    table.to_csv(path, index=False)
    return path


def run_forecast(checkpoint: str | Path, csv: str | Path, out: str | Path | None, plot: str | Path | None,
                 horizon: int | None = None, holdout: int = 0, columns: Sequence[str] | None = None,
                 plot_columns: int = 4, device: str = "cpu") -> ForecastOutput:
    """The `forecast` verb: forecast, write the dated CSV and the plot; print the scores with --holdout."""
    from .metrics import metric
    from .plots import plot_forecast

    model, recipe = load_forecaster(checkpoint, device)
    result = forecast_csv(model, csv, horizon=horizon, holdout=holdout, columns=columns)
    meta = model.info
    if out is not None:
        write_forecast(result, out, meta["date_column"])
        print(f"wrote {len(result.dates)} forecast rows ({result.dates[0]} .. {result.dates[-1]}, every "
              f"{result.freq}) for {len(result.columns)} column(s) to {out}")
    if result.truth is not None:
        scores = metric(result.values, result.truth)
        print(f"held-out {holdout} rows, original scale: MSE {scores['mse']:.6g}  MAE {scores['mae']:.6g}")
    if plot is not None:
        shown = list(range(len(result.columns)))
        if not columns:
            shown = shown[-plot_columns:]          # the target (last) column and its neighbours
        context = min(len(result.history), max(3 * len(result.dates), meta["seq_len"]))
        title = f"{MODEL_TITLES.get(recipe.model.name, recipe.model.name)} forecast of {Path(csv).name}"
        plot_forecast(plot, [result.columns[i] for i in shown], result.history_dates[-context:],
                      result.history[-context:][:, shown], result.dates, result.values[:, shown],
                      None if result.truth is None else result.truth[:, shown], title=title)
        print(f"wrote the plot to {plot}")
    return result
