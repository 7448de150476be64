"""S-Mamba's published ETTh1 numbers against S-Mamba's own code, run here.

mambakit's reproduction (benchmarks/timeseries_etth1.py) lands 0.001-0.008 MSE above the paper's per-horizon
values. This script asks whether upstream's code does any better on the same machine: it runs the upstream
repository's `run.py` (a checkout of wzhwzhwzh0921/S-D-Mamba) with the arguments of its
`scripts/multivariate_forecasting/ETT/S_Mamba_ETTh1.sh`, its `fix_seed` set to each seed asked for, and the
Mamba it was published with (`mamba_ssm` 1.2.0 from an unpacked sdist: the module's slow path, with the
package's own `selective_scan_ref` in place of the CUDA kernel, which computes the same function). Nothing of
mambakit is involved. Each run's test MSE / MAE lands next to the paper's and mambakit's in one table.

    pip download --no-deps --no-binary :all: mamba-ssm==1.2.0   # or fetch the sdist; unpack it
    pip install einops                                           # mamba_ssm's one extra import
    python benchmarks/timeseries_upstream.py --sdm PATH/S-D-Mamba --mamba-ssm PATH/mamba_ssm-1.2.0 \\
        --data PATH/ETT-small --horizons 96,192,336,720 --seeds 2023,2021,2022 --jobs 2

Runs are independent processes (one torch thread each, `--jobs` at a time) in temporary folders, since
upstream writes its checkpoints and plots to the working directory; finished runs are appended to
results/timeseries_etth1_upstream_runs.jsonl (--out) and skipped when the script is run again. About 15 minutes per
run on one core of the machine in benchmarks/README.md (upstream evaluates the test set one window at a time
after every epoch). Stubs stand in for what the run never calls: `selective_scan_cuda` (the unbuilt CUDA
extension), `reformer_pytorch` (a baseline model upstream imports) and mamba_ssm's language model (it imports
transformers); `np.Inf`, removed in numpy 2, is restored.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OURS = RESULTS / "timeseries_etth1.json"

# scripts/multivariate_forecasting/ETT/S_Mamba_ETTh1.sh
LEARNING_RATE = {96: 7e-5, 192: 7e-5, 336: 5e-5, 720: 5e-5}
EPOCH = re.compile(r"Epoch: (\d+), Steps: \d+ \| Train Loss: ([\d.]+) Vali Loss: ([\d.]+) Test Loss: ([\d.]+)")
FINAL = re.compile(r"mse:([\d.eE+-]+), mae:([\d.eE+-]+)")


def upstream_args(horizon: int, data: Path, seed: int, extra: str = "") -> list[str]:
    return ["--is_training", "1", "--root_path", f"{data}/", "--data_path", "ETTh1.csv",
            "--model_id", f"ETTh1_96_{horizon}_seed{seed}", "--model", "S_Mamba", "--data", "ETTh1",
            "--features", "M", "--seq_len", "96", "--pred_len", str(horizon), "--e_layers", "2", "--enc_in", "7",
            "--dec_in", "7", "--c_out", "7", "--des", "Exp", "--d_model", "256", "--d_state", "2", "--d_ff", "256",
            "--itr", "1", "--learning_rate", str(LEARNING_RATE[horizon]), "--num_workers", "0", *extra.split()]


def child(sdm: Path, mamba_ssm: Path, seed: int, run_args: list[str]) -> None:
    """In the run's own process and folder: stubs, upstream's Mamba on its reference scan, then run.py."""
    import types
    sys.path[:0] = [str(mamba_ssm), str(sdm)]
    for name, attrs in (("selective_scan_cuda", {}), ("reformer_pytorch", {"LSHSelfAttention": object}),
                        ("mamba_ssm.models.mixer_seq_simple", {"MambaLMHeadModel": None})):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    import numpy as np
    import torch
    np.Inf = np.inf
    torch.set_num_threads(1)
    import mamba_ssm.modules.mamba_simple as mamba_simple
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    mamba_simple.selective_scan_fn = selective_scan_ref
    source = (sdm / "run.py").read_text()
    if "fix_seed = 2023" not in source:
        raise SystemExit(f"{sdm / 'run.py'}: expected the line 'fix_seed = 2023' (S-D-Mamba's run.py)")
    sys.argv = ["run.py", *run_args]
    exec(compile(source.replace("fix_seed = 2023", f"fix_seed = {seed}"), str(sdm / "run.py"), "exec"),
         {"__name__": "__main__"})


def run_one(args, horizon: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="smamba_upstream_") as workdir:
        command = [sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--child", "--sdm", str(args.sdm),
                   "--mamba-ssm", str(args.mamba_ssm), "--seed", str(seed), "--",
                   *upstream_args(horizon, args.data.resolve(), seed, args.upstream_extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        start = time.time()
        proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.time() - start
    parsed = parse_run_output(proc.stdout) if proc.returncode == 0 else None
    if parsed is None:
        raise RuntimeError(f"upstream run H={horizon} seed={seed} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return dict(horizon=horizon, seed=seed, **parsed, wall_s=round(wall, 1), threads=1,
                finished=time.strftime("%Y-%m-%dT%H:%M:%S"))


def parse_run_output(stdout: str) -> dict | None:
    """Test MSE / MAE, epochs and per-epoch losses from what upstream's run.py prints; None without a result."""
    final = FINAL.findall(stdout)
    epochs = [dict(epoch=int(e), train=float(t), val=float(v), test=float(x)) for e, t, v, x in EPOCH.findall(stdout)]
    if not final or not epochs:
        return None
    return dict(test_mse=float(final[-1][0]), test_mae=float(final[-1][1]), epochs=len(epochs),
                best_epoch=min(epochs, key=lambda e: e["val"])["epoch"], per_epoch=epochs,
                device="cuda" if "Use GPU" in stdout else "cpu")


def load_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def markdown(runs: list[dict]) -> str:
    sys.path.insert(0, str(HERE))
    from timeseries_etth1 import REFERENCE
    ours = json.loads(OURS.read_text())["table"].get("smamba", {}) if OURS.is_file() else {}
    lines = ["# S-Mamba on ETTh1: upstream's own code, run here", "",
             f"Generated by `benchmarks/timeseries_upstream.py` on {time.strftime('%Y-%m-%dT%H:%M:%S')}: upstream "
             "S-D-Mamba `run.py` with its ETTh1 script's arguments and mamba_ssm 1.2.0's Mamba (reference scan), "
             "one torch thread per run, test MSE / MAE on the scaled data as upstream prints them. 'mambakit' is "
             "`benchmarks/results/timeseries_etth1.json` (mean ± std over its seeds).", "",
             "| horizon | upstream code: seed -> MSE / MAE (best epoch of epochs run) | upstream mean MSE / MAE | "
             "paper MSE / MAE | mambakit MSE / MAE | wall per run |", "|---|---|---|---|---|---|"]
    for horizon in sorted({r["horizon"] for r in runs}):
        rows = sorted((r for r in runs if r["horizon"] == horizon), key=lambda r: r["seed"])
        each = "; ".join(f"{r['seed']} -> {r['test_mse']:.4f} / {r['test_mae']:.4f} ({r['best_epoch']} of "
                         f"{r['epochs']}{', GPU' if r.get('device') == 'cuda' else ''})" for r in rows)
        mse, mae = (statistics.mean(r[k] for r in rows) for k in ("test_mse", "test_mae"))
        paper = REFERENCE["smamba"][horizon]
        mine = ours.get(str(horizon))
        mine_text = (f"{mine['test_mse']:.3f} ± {mine['test_mse_std']:.3f} / {mine['test_mae']:.3f} ± "
                     f"{mine['test_mae_std']:.3f} ({mine['n']} seeds)") if mine else "-"
        walls = [r["wall_s"] for r in rows if r.get("wall_s")]
        wall = f"{statistics.mean(walls):.0f} s" if walls else "-"
        lines.append(f"| {horizon} | {each} | {mse:.4f} / {mae:.4f} | {paper['mse']:.3f} / {paper['mae']:.3f} | "
                     f"{mine_text} | {wall} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdm", type=Path, help="a checkout of wzhwzhwzh0921/S-D-Mamba")
    ap.add_argument("--mamba-ssm", type=Path, help="an unpacked mamba_ssm-1.2.0 sdist (the folder holding mamba_ssm/)")
    ap.add_argument("--data", type=Path, help="the folder holding ETTh1.csv")
    ap.add_argument("--horizons", default="96,192,336,720")
    ap.add_argument("--seeds", default="2023")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--upstream-extra", default="",
                    help="more run.py arguments (e.g. '--train_epochs 1' for a smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the runs' JSONL and the table go")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table from the recorded runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.child:
        child(args.sdm.resolve(), args.mamba_ssm.resolve(), args.seed, rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    if not args.report_only:
        for path, what in ((args.sdm, "run.py"), (args.mamba_ssm, "mamba_ssm/modules/mamba_simple.py"),
                           (args.data, "ETTh1.csv")):
            if path is None or not (path / what).is_file():
                ap.error(f"expected {what} under {path} (see --help)")
        try:
            import einops  # noqa: F401
        except ImportError:
            ap.error("mamba_ssm imports einops: pip install einops")
        runs_file = args.out / "timeseries_etth1_upstream_runs.jsonl"
        done = {(r["horizon"], r["seed"]) for r in load_runs(runs_file)}
        todo = [(int(h), int(s)) for s in args.seeds.split(",") for h in args.horizons.split(",")
                if (int(h), int(s)) not in done]
        args.out.mkdir(parents=True, exist_ok=True)

        def record(job):
            row = run_one(args, *job)
            with runs_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"H={row['horizon']} seed={row['seed']}: MSE {row['test_mse']:.4f} MAE {row['test_mae']:.4f} "
                  f"({row['wall_s']:.0f} s)", flush=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(record, todo))
    runs = load_runs(args.out / "timeseries_etth1_upstream_runs.jsonl")
    if not runs:
        print("no recorded runs")
        return 0
    text = markdown(runs)
    (args.out / "timeseries_etth1_upstream.md").write_text(text)
    (args.out / "timeseries_etth1_upstream.json").write_text(json.dumps(dict(runs=runs), indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
