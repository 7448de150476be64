"""Forecast plots: history, forecast and (when known) the truth, one panel per chosen variate."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["plot_forecast", "plot_test_windows"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_forecast(path: str | Path, columns: Sequence[str], history_dates: pd.DatetimeIndex,
                  history: np.ndarray, forecast_dates: pd.DatetimeIndex, forecast: np.ndarray,
                  truth: np.ndarray | None = None, title: str = "") -> Path:
    """One panel per column: history (T, C) in grey, forecast (H, C) in colour, truth (H, C) dashed.

    Returns the path written (PNG, PDF or SVG by its suffix)."""
    history, forecast = np.asarray(history), np.asarray(forecast)
    c = len(columns)
    if history.shape[1] != c or forecast.shape[1] != c or (truth is not None and np.shape(truth) != forecast.shape):
        raise ValueError(f"plot_forecast: {c} columns but history {history.shape}, forecast {forecast.shape}, "
                         f"truth {None if truth is None else np.shape(truth)}")
    plt = _pyplot()
    fig, axes = plt.subplots(c, 1, figsize=(11, 2.4 * c + 0.6), sharex=True, squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[:, 0], columns)):
        ax.plot(history_dates, history[:, j], color="0.45", lw=1.0, label="history")
        # Join the forecast to the last observed point so the line does not start in the air.
        ax.plot(history_dates[-1:].append(forecast_dates), np.r_[history[-1, j], forecast[:, j]],
                color="tab:blue", lw=1.4, label="forecast")
        if truth is not None:
            ax.plot(history_dates[-1:].append(forecast_dates), np.r_[history[-1, j], np.asarray(truth)[:, j]],
                    color="tab:orange", lw=1.2, ls="--", label="truth")
        ax.axvline(history_dates[-1], color="0.7", lw=0.8)
        ax.set_ylabel(str(name))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=8, ncol=3)
    if title:
        axes[0, 0].set_title(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_test_windows(path: str | Path, column: str, dates_list: Sequence[pd.DatetimeIndex],
                      lookbacks: Sequence[np.ndarray], preds: Sequence[np.ndarray], trues: Sequence[np.ndarray],
                      title: str = "") -> Path:
    """A grid of test windows for one variate: lookback, truth and forecast of each (1-D arrays), with the
    dates of lookback + horizon in `dates_list`."""
    plt = _pyplot()
    k = len(lookbacks)
    cols = min(k, 2)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 2.6 * rows + 0.6), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols, i % cols]
        if i >= k:
            ax.axis("off")
            continue
        dates, look, pred, true = dates_list[i], lookbacks[i], preds[i], trues[i]
        n = len(look)
        ax.plot(dates[:n], look, color="0.45", lw=1.0, label="lookback")
        ax.plot(dates[n - 1:], np.r_[look[-1], true], color="tab:orange", lw=1.2, ls="--", label="truth")
        ax.plot(dates[n - 1:], np.r_[look[-1], pred], color="tab:blue", lw=1.3, label="forecast")
        ax.axvline(dates[n - 1], color="0.7", lw=0.8)
        ax.set_title(f"{column}: from {dates[n]:%Y-%m-%d %H:%M}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=3)
    if title:
        fig.suptitle(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
