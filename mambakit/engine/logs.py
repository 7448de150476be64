"""The run folder's metric logs: `metrics.jsonl` (one JSON object per row, appended as training goes),
`metrics.csv` (the same rows, columns = every key seen, rewritten at each evaluation and at the end),
TensorBoard event files under `tensorboard/` when the `tensorboard` package is installed, and the tqdm
progress bar. Only rank 0 writes; on other ranks every method is a no-op.

A row is a flat dict: `step` (optimiser steps done), `epoch` (fractional for training rows), and metric
keys named `<split>/<name>` (`train/loss`, `val/mse`, `val_ema/mse`, `test/mae`) or `lr`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["RunLogger", "format_metrics"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them readable instead of producing invalid JSON
    return value


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_metrics(metrics: dict[str, float], digits: int = 4) -> str:
    return "  ".join(f"{key} {value:.{digits}g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in metrics.items())


class RunLogger:
    def __init__(self, run_dir: str | Path | None, *, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, history: list[dict[str, Any]] | None = None):
        self.enabled = enabled and run_dir is not None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.history: list[dict[str, Any]] = list(history or [])
        self.show_progress = progress and enabled
        self._bar = None
        self._tb = None
        self.notes: list[str] = []
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        # The history (from a checkpoint on resume) is the truth: rows logged after that checkpoint by a
        # killed process are dropped, so the files never show the same step twice.
        _write_text_atomically(self.jsonl_path, "".join(json.dumps(self._clean(r)) + "\n" for r in self.history))
        self._jsonl = open(self.jsonl_path, "a")
        if tensorboard:
            self._tb = self._open_tensorboard()

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.note("tensorboard is not installed, so no TensorBoard logs are written "
                      "(pip install tensorboard to get them; metrics.jsonl/csv have everything)")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    @staticmethod
    def _clean(row: dict[str, Any]) -> dict[str, Any]:
        return {key: _jsonable(value) for key, value in row.items()}

    # ------------------------------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        """Record one row (every rank keeps the history; rank 0 writes it)."""
        self.history.append(dict(row))
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(self._clean(row)) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def write_csv(self) -> None:
        if not self.enabled:
            return
        columns: list[str] = []
        for row in self.history:
            columns.extend(key for key in row if key not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        _write_text_atomically(self.csv_path, buffer.getvalue())
        if self._tb is not None:
            self._tb.flush()

    def note(self, text: str) -> None:
        """A one-off message for the user (kept for summary.json)."""
        self.notes.append(text)
        self.message(f"note: {text}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------------
    def start_progress(self, total: int, initial: int = 0) -> None:
        if not (self.enabled and self.show_progress):
            return
        from tqdm.auto import tqdm
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                         desc="train")

    def advance(self, postfix: dict[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.enabled:
            return
        self.write_csv()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
