"""Plant small, plausible bugs in the forecasting app one at a time and check that the non-slow timeseries tests
catch each (issue 27). Every mutant is a single text replacement in a source file, restored afterwards even on
Ctrl-C; the script fails if a mutant's anchor text is gone (the code moved: update the table).

    python benchmarks/timeseries_mutate.py             # all mutants, tests/apps/timeseries -m 'not slow' -x
    python benchmarks/timeseries_mutate.py 0 3 --tests tests/apps/timeseries/test_timeseries_metrics.py

Prints one line per mutant, CAUGHT (with the first failing test) or SURVIVED, and exits 1 if any survived.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = "mambakit/apps/timeseries/"

#: (what the bug is, file, original text, mutated text)
MUTANTS = [
    ("MAE computed as squared error", APP + "metrics.py",
     'prefix + "ae": diff.abs().reshape(b, -1).sum(1)', 'prefix + "ae": diff.square().reshape(b, -1).sum(1)'),
    ("MS scores the prediction's first column", APP + "task.py",
     "pred, true = pred[..., -1:], true[..., -1:]", "pred, true = pred[..., :1], true[..., -1:]"),
    ("MS inverse-scales with the first column's mean / std", APP + "task.py",
     "scaler.select(slice(-1, None)) if self.config", "scaler.select(slice(0, 1)) if self.config"),
    ("seasonal naive one step early", APP + "metrics.py",
     "season = x[:, x.shape[1] - period:]", "season = x[:, x.shape[1] - period - 1:-1]"),
    ("forecast looks back one row early", APP + "forecast.py",
     "history = scaler.transform(values[-seq_len:])", "history = scaler.transform(values[-seq_len - 1:-1])"),
    ("forecast's calendar features of the wrong rows", APP + "forecast.py",
     "time_features(hist_dates[-seq_len:], freq)",
     "time_features(hist_dates[-seq_len:] + pd.Timedelta(hours=1), freq)"),
    ("forecast ignores the run's data.fill", APP + "forecast.py",
     'fill=meta.get("fill", "none"))', 'fill="none")'),
    ("interpolate fills with the previous value", APP + "data.py",
     "out[~known, j] = np.interp(t[~known], t[known], values[known, j])",
     "out[~known, j] = values[np.maximum.accumulate(np.where(known, t, 0))[~known], j]"),
    ("test-window plot de-scales with column 0", APP + "task.py",
     "* scaler.std[column] + scaler.mean[column]", "* scaler.std[0] + scaler.mean[0]"),
    ("scaler std with ddof=1 (not TSLib's population std)", APP + "data.py",
     "std = values.std(axis=0)", "std = values.std(axis=0, ddof=1)"),
    ("long files: ids in file order instead of sorted", APP + "data.py",
     "names = sorted(ids.unique())", "names = list(ids.unique())"),
]


def run_mutant(index: int, tests: list[str]) -> bool:
    """True when the tests fail with the mutant in place."""
    name, rel, original, mutated = MUTANTS[index]
    path = ROOT / rel
    text = path.read_text()
    if text.count(original) != 1:
        raise SystemExit(f"mutant {index} ({name}): {rel} holds its anchor {text.count(original)} times, not once")
    path.write_text(text.replace(original, mutated))
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                               *tests], cwd=ROOT, capture_output=True, text=True, env=env)
    finally:
        path.write_text(text)
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    caught = proc.returncode != 0
    verdict = "SURVIVED" if not caught else "CAUGHT" + (f" by {failed[0].split(' ', 1)[1]}" if failed else "")
    print(f"[{index}] {name}: {verdict}", flush=True)
    return caught


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mutants", nargs="*", type=int, help="indices to run (default: all)")
    parser.add_argument("--tests", nargs="+", default=["tests/apps/timeseries"])
    args = parser.parse_args(argv)
    picks = args.mutants or range(len(MUTANTS))
    survived = [i for i in picks if not run_mutant(i, args.tests)]
    print(f"{len(list(picks)) - len(survived)} caught, {len(survived)} survived")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
