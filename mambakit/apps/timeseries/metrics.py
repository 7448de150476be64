"""Forecast metrics as the long-term forecasting papers report them, and the seasonal-naive baseline.

TSLib (`utils/metrics.py`) scores the test set as one array of shape (windows, pred_len, variates) on the
scaled data: MSE = mean((pred - true)^2) and MAE = mean(|pred - true|) over every element, so every window,
step and variate weighs the same. To stay exact when the windows are split over batches and ranks, the task
returns per-window sums (`window_errors`) and `reduce_errors` divides the totals once.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["window_errors", "reduce_errors", "metric", "seasonal_naive"]


def window_errors(pred: torch.Tensor, true: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """Per-window sums over (steps, variates): {prefix+'se', prefix+'ae', prefix+'n'}, each (B,) float64.

    pred, true: (B, H, N)."""
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} differ in shape")
    diff = pred.detach().double() - true.detach().double()
    b = diff.shape[0]
    return {
        prefix + "se": diff.square().reshape(b, -1).sum(1),
        prefix + "ae": diff.abs().reshape(b, -1).sum(1),
        prefix + "n": torch.full((b,), float(diff[0].numel()) if b else 0.0, dtype=torch.float64,
                                 device=diff.device),
    }


def reduce_errors(outputs: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """MSE, MAE and RMSE over all windows from the per-window sums of `window_errors`."""
    n = outputs[prefix + "n"].double().sum()
    if n <= 0:
        raise ValueError("no windows to score")
    mse = float(outputs[prefix + "se"].double().sum() / n)
    mae = float(outputs[prefix + "ae"].double().sum() / n)
    return {prefix + "mse": mse, prefix + "mae": mae, prefix + "rmse": mse ** 0.5}


def metric(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """TSLib's `metric()` on whole arrays: MAE, MSE, RMSE, MAPE, MSPE (MAPE/MSPE are inf where true == 0)."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    err = pred - true
    mse = float(np.mean(err ** 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        mape = float(np.mean(np.abs(err / true)))
        mspe = float(np.mean(np.square(err / true)))
    return {"mae": float(np.mean(np.abs(err))), "mse": mse, "rmse": mse ** 0.5, "mape": mape, "mspe": mspe}


def seasonal_naive(x: torch.Tensor, pred_len: int, period: int) -> torch.Tensor:
    """Repeat the last `period` steps of the lookback: x (B, L, N) -> (B, pred_len, N) with
    forecast[t] = x[L - period + (t mod period)]."""
    if not 1 <= period <= x.shape[1]:
        raise ValueError(f"seasonal period must be in [1, lookback={x.shape[1]}], got {period}")
    season = x[:, x.shape[1] - period:]
    reps = -(-pred_len // period)
    return season.repeat(1, reps, 1)[:, :pred_len]
