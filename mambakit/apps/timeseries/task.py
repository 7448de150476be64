"""The forecasting recipe (`configs/timeseries/*.yaml`) and the task hooks the engine trains it through.

The protocol is TSLib's long-term forecasting experiment (S-D-Mamba `experiments/exp_long_term_forecasting.py`):
MSE loss on the scaled data between the forecast and the horizon part of `y` (for features MS only the last,
target, column), validation loss = MSE over the validation windows (early stopping monitors it), test MSE / MAE
over every test window, step and variate on the scaled data, with the best-validation weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mambakit.engine.task import Datasets, PretrainedReport, Task, load_matching

from .config import ForecastData, ForecastEval, ForecastRecipe
from .data import DataError, ForecastSplits, StandardScaler, build_splits, read_series
from .metrics import reduce_errors, seasonal_naive, window_errors
from .models import build_model

__all__ = ["ForecastData", "ForecastEval", "ForecastRecipe", "ForecastTask", "Forecaster", "resolve_data_path"]


MODEL_TITLES = {"smamba": "S-Mamba", "itransformer": "iTransformer", "dlinear": "DLinear"}


def resolve_data_path(data: ForecastData) -> Path:
    """The CSV a recipe reads: `data.path`, or the registry dataset fetched into the cache."""
    if data.path is not None:
        return Path(data.path).expanduser()
    from mambakit.data import fetch, get_dataset, register_dataset

    from .datasets import DATASETS

    for entry in DATASETS:
        register_dataset(entry)
    entry = get_dataset(data.dataset)
    folder = fetch(entry.name)
    csvs = [f.name for f in entry.files if f.name.endswith(".csv")]
    if len(csvs) != 1:
        raise DataError(f"dataset {entry.name!r} has {len(csvs)} CSV files; set data.path to the one to use")
    return folder / csvs[0]


# --------------------------------------------------------------------------------------------------
# the model as saved: network + what forecasting new data needs

class Forecaster(nn.Module):
    """A forecasting network together with the training scaler and the data description, so that a
    checkpoint alone can forecast a new CSV (`mambakit timeseries forecast`).

    Buffers: `scaler_mean`, `scaler_std` (C,) float64, and `meta` (uint8) holding JSON: columns, target,
    features, freq, mark_names, seq_len, label_len, pred_len, date_column. forward(x, x_mark) = net(x, x_mark)
    on scaled data, (B, seq_len, C) -> (B, pred_len, C)."""

    def __init__(self, net: nn.Module, scaler: StandardScaler | None, meta: Mapping[str, Any]):
        super().__init__()
        self.net = net
        c = len(meta["columns"])
        mean = np.zeros(c) if scaler is None else scaler.mean
        std = np.ones(c) if scaler is None else scaler.std
        self.register_buffer("scaler_mean", torch.as_tensor(np.asarray(mean), dtype=torch.float64))
        self.register_buffer("scaler_std", torch.as_tensor(np.asarray(std), dtype=torch.float64))
        self.register_buffer("meta", self.encode_meta(meta))

    def forward(self, x: torch.Tensor, x_mark: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, x_mark)

    @staticmethod
    def encode_meta(meta: Mapping[str, Any]) -> torch.Tensor:
        return torch.tensor(list(json.dumps(dict(meta), sort_keys=True).encode()), dtype=torch.uint8)

    @staticmethod
    def decode_meta(buffer: torch.Tensor) -> dict[str, Any]:
        return json.loads(bytes(buffer.cpu().to(torch.uint8).tolist()).decode())

    @property
    def info(self) -> dict[str, Any]:
        return self.decode_meta(self.meta)

    @property
    def scaler(self) -> StandardScaler:
        return StandardScaler(mean=self.scaler_mean.cpu().numpy(), std=self.scaler_std.cpu().numpy())


#: Buffers that describe the training data, not the network: a fine-tune on other data must not take them.
DATA_BUFFERS = ("scaler_mean", "scaler_std", "meta")


# --------------------------------------------------------------------------------------------------
# the task

class ForecastTask(Task):
    """Long-term forecasting with TSLib's protocol; see the module docstring."""

    app = "timeseries"

    def __init__(self, config: ForecastRecipe):
        super().__init__(config)
        self._splits: ForecastSplits | None = None

    # data ---------------------------------------------------------------------------------------------
    @property
    def splits(self) -> ForecastSplits:
        if self._splits is None:
            d = self.config.data
            frame = read_series(resolve_data_path(d), date_column=d.date_column, columns=d.columns,
                                target=d.target, features=d.features, id_column=d.id_column, freq=d.freq,
                                fill=d.fill)
            if frame.fill_note():
                print(f"note: {frame.fill_note()}", file=sys.stderr, flush=True)
            self._splits = build_splits(frame, d.seq_len, d.label_len, d.pred_len, split=d.split,
                                        ratios=d.split_ratios, scale=d.scale, freq=d.freq, timeenc=d.timeenc,
                                        date_column=d.date_column)
        return self._splits

    def data_meta(self) -> dict[str, Any]:
        s, d = self.splits, self.config.data
        return {"columns": s.columns, "target": s.target, "features": s.features, "freq": s.freq,
                "mark_names": s.mark_names, "seq_len": d.seq_len, "label_len": d.label_len,
                "pred_len": d.pred_len, "date_column": d.date_column, "model": self.config.model.name,
                # how the file was read, so that `forecast` reads a new one the same way
                "id_column": d.id_column, "source_columns": list(s.source_columns or s.columns), "fill": d.fill,
                "data_freq": d.freq}

    def build_datasets(self) -> Datasets:
        s = self.splits
        return Datasets(train=s.train, val=s.val, test=s.test)

    def build_model(self) -> nn.Module:
        d = self.config.data
        net = build_model(self.config.model, d.seq_len, d.pred_len, self.splits.n_variates)
        return Forecaster(net, self.splits.scaler, self.data_meta())

    # steps ----------------------------------------------------------------------------------------------
    def forecast_batch(self, model: nn.Module, batch: Mapping[str, torch.Tensor]):
        """(forecast, truth) on the scored columns: all of them, or the target alone for features MS."""
        marks = batch["x_mark"] if batch["x_mark"].shape[-1] > 0 else None
        pred = model(batch["x"], marks)
        true = batch["y"][:, -self.config.data.pred_len:]
        if self.config.data.features == "MS":
            pred, true = pred[..., -1:], true[..., -1:]
        return pred, true

    def training_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pred, true = self.forecast_batch(model, batch)
        return F.mse_loss(pred, true)

    def eval_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred, true = self.forecast_batch(model, batch)
        out = window_errors(pred, true)
        ev = self.config.eval
        if ev.original_scale:
            scaler = self._scored_scaler()
            out.update(window_errors(scaler.inverse_transform(pred.double()), scaler.inverse_transform(true.double()),
                                     prefix="orig_"))
        if ev.seasonal_period is not None:
            naive = seasonal_naive(batch["x"], self.config.data.pred_len, ev.seasonal_period)
            if self.config.data.features == "MS":
                naive = naive[..., -1:]
            out.update(window_errors(naive, true, prefix="naive_"))
        return out

    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        metrics = reduce_errors(outputs)
        result = {"loss": metrics["mse"], "mse": metrics["mse"], "mae": metrics["mae"]}
        for prefix in ("orig_", "naive_"):
            if prefix + "se" in outputs:
                extra = reduce_errors(outputs, prefix)
                result[prefix + "mse"], result[prefix + "mae"] = extra[prefix + "mse"], extra[prefix + "mae"]
        return result

    def _scored_scaler(self) -> StandardScaler:
        scaler = self.splits.scaler or StandardScaler(np.zeros(self.splits.n_variates), np.ones(self.splits.n_variates))
        return scaler.select(slice(-1, None)) if self.config.data.features == "MS" else scaler

    # fine-tuning and artefacts ----------------------------------------------------------------------------
    def load_pretrained(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> PretrainedReport:
        """The network's weights only: the scaler and data description stay those of the new data. Weights
        saved by the upstream code (S-D-Mamba / iTransformer checkpoint.pth) are converted first."""
        from .convert import convert_upstream_state_dict, is_upstream_state_dict

        if is_upstream_state_dict(state_dict):
            state_dict = convert_upstream_state_dict(state_dict)
        weights = {k: v for k, v in state_dict.items() if k not in DATA_BUFFERS}
        return load_matching(model, weights)

    def on_fit_end(self, model: nn.Module, run_dir) -> None:
        if self.config.eval.plot_windows > 0:
            plot_test_forecasts(self, model, Path(run_dir) / "test_forecast.png")


def plot_test_forecasts(task: ForecastTask, model: nn.Module, path: Path, count: int | None = None) -> Path:
    """Draw `count` evenly spaced test windows of the scored target column (original scale)."""
    from .plots import plot_test_windows

    s = task.splits
    test = s.test
    count = count or task.config.eval.plot_windows
    picks = np.unique(np.linspace(0, len(test) - 1, num=min(count, len(test))).round().astype(int))
    device = next(model.parameters()).device
    scaler = s.scaler or StandardScaler(np.zeros(s.n_variates), np.ones(s.n_variates))
    column = len(s.columns) - 1         # the target (last) column, or the last variate for M
    dates_list, looks, preds, trues = [], [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in picks:
            item = test[int(i)]
            batch = {k: v.unsqueeze(0).to(device) for k, v in item.items()}
            pred, _ = task.forecast_batch(model, batch)
            pred = pred[0, :, -1].double().cpu().numpy() * scaler.std[column] + scaler.mean[column]
            look = scaler.inverse_transform(item["x"].double().numpy())[:, column]
            true = scaler.inverse_transform(item["y"][-task.config.data.pred_len:].double().numpy())[:, column]
            start = test.offset + int(i)
            dates_list.append(s.dates[start:start + task.config.data.seq_len + task.config.data.pred_len])
            looks.append(look)
            preds.append(pred)
            trues.append(true)
    model.train(was_training)
    title = f"{MODEL_TITLES.get(task.config.model.name, task.config.model.name)}: test windows, {s.columns[column]}"
    return plot_test_windows(path, s.columns[column], dates_list, looks, preds, trues, title=title)
