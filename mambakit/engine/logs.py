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

__all__ = ["RunLogger", "format_metrics", "list_artefacts", "format_artefacts", "format_size"]


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


def format_size(n: int) -> str:
    """Bytes for people: 512 B, 12.3 KiB, 4.0 MiB, 1.2 GiB."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


def list_artefacts(folder: str | Path) -> list[tuple[str, int]]:
    """Every file under `folder` as (path relative to it, bytes), sorted; temporary files are left out."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and ".tmp-" not in path.name:
            found.append((path.relative_to(folder).as_posix(), path.stat().st_size))
    return found


def format_artefacts(folder: str | Path, artefacts: list[tuple[str, int]], per_folder: int = 12) -> str:
    """The list printed at the end of a run: one line per file with its size; a sub-folder with more than
    `per_folder` files (heatmaps of every slide) shows its first ones and a line with the rest's count and size."""
    total = sum(size for _, size in artefacts)
    lines = [f"wrote {len(artefacts)} file(s), {format_size(total)}, in {folder}:"]
    width = max((len(name) for name, _ in artefacts), default=0)
    shown: dict[str, int] = {}
    rest: dict[str, list[int]] = {}
    for name, size in artefacts:
        parent = name.rsplit("/", 1)[0] if "/" in name else ""
        shown[parent] = shown.get(parent, 0) + 1
        if shown[parent] > per_folder:
            rest.setdefault(parent, []).append(size)
            continue
        lines.append(f"  {name:<{width}}  {format_size(size):>10}")
    for parent, sizes in rest.items():
        lines.append(f"  {parent}/: {len(sizes)} more file(s), {format_size(sum(sizes))}")
    return "\n".join(lines)


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
