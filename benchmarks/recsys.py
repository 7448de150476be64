"""Sequential recommendation benchmarks. Two parts, each writing JSON + markdown into benchmarks/results/.

speed     Training step (forward + cross-entropy over all items + backward + Adam step) time and peak memory of
          Mamba4Rec and TiM4Rec against SASRec at max lengths 50, 200 and 1000, synthetic item ids (every
          position valid), ratios to SASRec from the same run. Each (model, length) runs in a fresh subprocess:
          time = median over repeats after a warm-up step; peak memory = the process's RSS high-water mark
          over the warm-up and measured steps (VmHWM, reset through /proc/self/clear_refs before the first
          step) minus its RSS before it, with model and batch already built (on CUDA: the same with
          torch.cuda.max_memory_allocated - memory_allocated). -> results/recsys_speed.{json,md}

ml100k    All four models and most-popular on MovieLens-100k under one protocol (RecBole's leave-one-out, full
          ranking, no masking of seen items), 3 seeds each, through `mambakit recsys train` recipes
          (configs/recsys/<model>_ml100k.yaml) with a common budget given on the command line (epochs, batch
          size, patience; the recipes' own 300 epochs at batch 2048 take hours per run on 2 cores); mean and
          spread (sample std) of the test metrics of the best-validation-NDCG@10 weights, and wall time.
          `--times exact` (the recipes' default: exact timestamps, equal ones in a fixed (user, item) hash
          order) or `--times recbole` (float32 timestamps, equal ones in file order, as RecBole; to compare
          with numbers published from RecBole); `--max-len` overrides the recipes' 200.
          Finished runs are kept in the JSON, so an interrupted run continues where it stopped.
          -> results/recsys_ml100k.{json,md}

Usage:
    python benchmarks/recsys.py speed [--lengths 50 200 1000] [--batch 64] [--repeats 5] [--device cpu]
    python benchmarks/recsys.py ml100k [--times exact|recbole] [--max-len 200] [--epochs 5] [--patience 2]
                                       [--batch-size 256] [--seeds 0 1 2] [--models ...] [--out STEM]
    python benchmarks/recsys.py merge recsys_ml100k_a recsys_ml100k_b     # seeds run in parallel -> one table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ROOT / "configs" / "recsys"
TITLES = {"mamba4rec": "Mamba4Rec", "tim4rec": "TiM4Rec", "sasrec": "SASRec", "gru4rec": "GRU4Rec",
          "mostpop": "most popular"}


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------------------
# speed

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def speed_case(model: str, L: int, batch: int, n_items: int, repeats: int, device: str) -> dict:
    """One (model, length) measurement, in this process (the parent runs each in a fresh subprocess)."""
    import torch
    import torch.nn.functional as F

    from mambakit.apps.recsys.config import Mamba4RecConfig, SASRecConfig, TiM4RecConfig
    from mambakit.apps.recsys.models import build_model

    configs = {"mamba4rec": Mamba4RecConfig(), "tim4rec": TiM4RecConfig(), "sasrec": SASRecConfig()}
    torch.manual_seed(0)
    net = build_model(configs[model], n_items, L).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(1, n_items, (batch, L), generator=gen).to(device)
    length = torch.full((batch,), L, device=device)
    times = (1e9 + torch.cumsum(torch.randint(1, 10**5, (batch, L), generator=gen), 1).double()).to(device)
    target = torch.randint(1, n_items, (batch,), generator=gen).to(device)

    def step():
        loss = F.cross_entropy(net(seq, length, times, scores=True), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    # Memory: from before the first step (model and batch already allocated), so the peak covers activations,
    # gradients and the Adam state created by the first step.
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = True
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            reset = False
        base = _status_kb("VmRSS:")
    step()                                   # warm-up (not timed): allocator, kernels, Adam state
    times_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times_s.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = ((_status_kb("VmHWM:") or 0) - (base or 0)) * 1024 if reset else None
        how = "VmHWM - VmRSS"
    return {"model": model, "L": L, "batch": batch, "step_s": statistics.median(times_s), "steps": times_s,
            "peak_bytes": peak, "memory": how, "params": sum(p.numel() for p in net.parameters())}


def run_speed(args) -> dict:
    info = machine()
    if args.threads:
        info["torch_threads"] = args.threads
    rows = []
    for L in args.lengths:
        for model in args.models:
            cmd = [sys.executable, __file__, "_speed_case", model, str(L), str(args.batch), str(args.n_items),
                   str(args.repeats), args.device, str(args.threads or 0)]
            print(f"speed: {model} L={L} ...", flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            except subprocess.TimeoutExpired:
                rows.append({"model": model, "L": L, "batch": args.batch, "error": f"timeout {args.timeout}s"})
                continue
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                rows.append({"model": model, "L": L, "batch": args.batch, "error": tail[0][:300]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]['step_s']:.3f} s/step, peak {_gib(rows[-1]['peak_bytes'])}", flush=True)
    for row in rows:
        ref = next((r for r in rows if r["model"] == "sasrec" and r["L"] == row["L"] and "step_s" in r), None)
        if ref and "step_s" in row:
            row["time_vs_sasrec"] = row["step_s"] / ref["step_s"]
            if row.get("peak_bytes") and ref.get("peak_bytes"):
                row["memory_vs_sasrec"] = row["peak_bytes"] / ref["peak_bytes"]
    return {"benchmark": "recsys_speed", "machine": info, "device": args.device, "n_items": args.n_items,
            "batch": args.batch, "repeats": args.repeats, "rows": rows, "load_avg_end": os.getloadavg()}


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def speed_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "## Sequential recommendation: training step time and peak memory",
        "",
        f"One training step (forward, cross-entropy over all {result['n_items']} items, backward, Adam) at batch "
        f"{result['batch']}, every position valid, synthetic ids; median of {result['repeats']} steps after a "
        f"warm-up, each (model, length) in a fresh process. Device: {result['device']}"
        + (f" ({m['gpu']})" if result["device"] == "cuda" and "gpu" in m else
           f" ({m['cpu']}, {m['torch_threads']} threads)") + f"; torch {m['torch']}. Load average at start "
        f"{m['load_avg_start'][0]:.2f}, at end {result['load_avg_end'][0]:.2f}. Models at their upstream "
        "MovieLens configs (Mamba4Rec: 1 layer, d=64, d_state 32; TiM4Rec: 2 layers, d=64, head_dim 32, "
        "d_state 32; SASRec: RecBole's 2 layers, 2 heads, d=64). Ratios are to SASRec at the same length.",
        "",
        "| model | max length | step (s) | vs SASRec | peak memory | vs SASRec |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {TITLES[r['model']]} | {r['L']} | failed: {r['error']} | | | |")
            continue
        t = f"{r['time_vs_sasrec']:.2f}x" if "time_vs_sasrec" in r else ""
        mem = f"{r['memory_vs_sasrec']:.2f}x" if "memory_vs_sasrec" in r else ""
        lines.append(f"| {TITLES[r['model']]} | {r['L']} | {r['step_s']:.3f} | {t} | {_gib(r['peak_bytes'])} | {mem} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# ml100k accuracy

TIME_MODES = {"exact": ["data.time_precision=float64", "data.tie_break=hash"],
              "recbole": ["data.time_precision=float32", "data.tie_break=file"]}


def run_one(model: str, seed: int, epochs: int, patience: int, batch_size: int, lr: float, out_dir: Path,
            times: str = "exact", max_len: int | None = None) -> dict:
    """Train one recipe through the app (as `mambakit recsys train` does) and return its summary."""
    from mambakit.apps.recsys.config import RecsysRecipe
    from mambakit.apps.recsys.task import RecsysTask, popularity_metrics
    from mambakit.engine.config import load_config
    from mambakit.engine.trainer import Trainer

    recipe = CONFIGS / f"{model}_ml100k.yaml"
    overrides = [f"train.seed={seed}", f"run.out_dir={out_dir}", "run.progress=false", "run.curves=true",
                 *TIME_MODES[times], *([f"data.max_len={max_len}"] if max_len else [])]
    if model != "mostpop":
        overrides += [f"train.epochs={epochs}", f"train.early_stopping.patience={patience}",
                      f"train.batch_size={batch_size}", f"train.optimizer.lr={lr}"]
    config = load_config(RecsysRecipe, recipe, overrides)
    started = time.time()
    if model == "mostpop":
        metrics = {f"{s}/{k}": v for s in ("val", "test") for k, v in popularity_metrics(config, s).items()}
        return {"model": model, "seed": seed, "metrics": metrics, "wall_time_s": time.time() - started,
                "epochs": 0, "best_epoch": None}
    result = Trainer(RecsysTask(config)).fit(out_dir / f"{model}-{times}-seed{seed}")
    return {"model": model, "seed": seed, "metrics": result.metrics, "wall_time_s": result.wall_time_s,
            "epochs": result.epochs, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
            "run_dir": str(result.run_dir)}


def run_ml100k(args) -> dict:
    path = RESULTS / f"{args.out}.json"
    previous = json.loads(path.read_text()) if path.is_file() and not args.fresh else {}
    protocol = {"epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size, "lr": args.lr,
                "max_len": args.max_len or 200, "times": args.times}
    same = previous.get("protocol") == protocol
    runs = previous.get("runs", []) if same else []
    result = {"benchmark": "recsys_ml100k", "machine": previous.get("machine") if same else machine(),
              "protocol": protocol, "runs": runs}
    out_dir = Path(args.out_dir)
    for seed in args.seeds:              # every model gets seed 0 before any gets seed 1
        for model in args.models:
            if any(r["model"] == model and r["seed"] == seed for r in runs):
                continue
            print(f"ml100k: {model} seed {seed} ...", flush=True)
            row = run_one(model, seed, args.epochs, args.patience, args.batch_size, args.lr, out_dir, args.times,
                          args.max_len)
            row["load_avg_after"] = os.getloadavg()
            runs.append(row)
            m = row["metrics"]
            print(f"  test NDCG@10 {m['test/ndcg@10']:.4f} HR@10 {m['test/hit@10']:.4f} "
                  f"({row['wall_time_s']:.0f} s, {row['epochs']} epochs)", flush=True)
            result["load_avg_end"] = os.getloadavg()
            _write(result, args.out, ml100k_markdown(result))
    result["load_avg_end"] = os.getloadavg()
    return result


def merge_ml100k(args) -> dict:
    """Combine the runs of several result files (e.g. seeds run in parallel processes) into one table."""
    parts = [json.loads((RESULTS / f"{stem}.json").read_text()) for stem in args.parts]
    protocols = {json.dumps(p["protocol"], sort_keys=True) for p in parts}
    if len(protocols) != 1:
        raise SystemExit(f"the parts were run under different protocols: {sorted(protocols)}")
    # each run keeps the thread count and machine load of the process that ran it
    runs = {(r["model"], r["seed"]): {**r, "torch_threads": r.get("torch_threads", p["machine"]["torch_threads"])}
            for p in parts for r in p["runs"]}
    first = parts[0]
    return {"benchmark": "recsys_ml100k", "machine": first["machine"], "protocol": first["protocol"],
            "merged_from": list(args.parts), "runs": sorted(runs.values(), key=lambda r: (r["seed"], r["model"])),
            "load_avg_end": next((p["load_avg_end"] for p in reversed(parts) if "load_avg_end" in p), None)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _times_text(protocol: dict) -> str:
    """Results written before the time options existed were float32 times in file order (RecBole's)."""
    if protocol.get("times", "recbole") == "recbole":
        return "float32 timestamps with ties in file order (RecBole's order)"
    return "exact timestamps with ties in a fixed (user, item) hash order"


def ml100k_markdown(result: dict) -> str:
    m = result["machine"]
    p = result["protocol"]
    keys = ["hit@10", "ndcg@10", "mrr@10", "hit@20", "ndcg@20"]
    lines = [
        "## Sequential recommendation: MovieLens-100k, one protocol for every model",
        "",
        f"RecBole's ml-100k atomic files, 5-core, max length {p['max_len']}, {_times_text(p)}, leave-one-out "
        "(last item test, second last validation, every earlier prefix a training example), full ranking over "
        "all 1,349 items, seen items not masked (RecBole 1.2.1's sequential setting). Each model at its "
        "upstream / RecBole config "
        f"(configs/recsys/<model>_ml100k.yaml; CE over all items, Adam lr {p['lr']:g}) with a budget that fits "
        f"a 2-core CPU: batch {p['batch_size']}, at most {p['epochs']} epochs, early stopping on validation "
        f"NDCG@10 (patience {p['patience']}); test metrics "
        "of the best-validation weights. Mean ± sample std over seeds; wall time of each run on "
        f"{m['cores']} cores ({m['cpu']}) in seed order, with its torch threads, and the load average "
        "(1 min) after each run: a load well above the thread count means the run shared the cores"
        + (f" (runs merged from {', '.join(result['merged_from'])})" if result.get("merged_from") else "")
        + ".",
        "",
        "| model | seeds | " + " | ".join(k.upper().replace("HIT", "HR") for k in keys)
        + " | epochs (best) | wall time per run | load avg after |",
        "|---|---:|" + "---:|" * len(keys) + "---:|---:|---:|",
    ]
    order = [k for k in ("mamba4rec", "tim4rec", "sasrec", "gru4rec", "mostpop")]
    for model in order:
        runs = [r for r in result["runs"] if r["model"] == model]
        if not runs:
            continue
        cells = []
        for k in keys:
            mean, std = _mean_std([r["metrics"][f"test/{k}"] for r in runs])
            cells.append(f"{mean:.4f} ± {std:.4f}")
        if model == "mostpop":
            ep = "-"
        else:
            ep = f"{statistics.fmean(r['epochs'] for r in runs):.0f} " \
                 f"({', '.join(str(r['best_epoch']) for r in runs)})"
        runs = sorted(runs, key=lambda r: r["seed"])
        walls = ", ".join(f"{r['wall_time_s'] / 60:.1f}" + f" ({r.get('torch_threads', m['torch_threads'])}t)"
                          for r in runs)
        loads = ", ".join(f"{r.get('load_avg_after', [float('nan')])[0]:.1f}" for r in runs)
        lines.append(f"| {TITLES[model]} | {len(runs)} | " + " | ".join(cells) + f" | {ep} | "
                     f"{walls} min | {loads} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------

def _write(result: dict, stem: str, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_speed_case":
        model, L, batch, n_items, repeats, device, threads = sys.argv[2:9]
        if int(threads):
            import torch
            torch.set_num_threads(int(threads))
        print(json.dumps(speed_case(model, int(L), int(batch), int(n_items), int(repeats), device)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 1000])
    sp.add_argument("--models", nargs="+", default=["sasrec", "mamba4rec", "tim4rec"])
    sp.add_argument("--batch", type=int, default=64)
    sp.add_argument("--n-items", type=int, default=3707, help="ML-1M's item count plus padding")
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sp.add_argument("--timeout", type=int, default=1800)
    sp.add_argument("--out", default="recsys_speed", help="result file stem in benchmarks/results/")
    sp.add_argument("--threads", type=int, default=None, help="torch threads in each measuring process")
    ml = sub.add_parser("ml100k")
    ml.add_argument("--models", nargs="+", default=["mostpop", "gru4rec", "sasrec", "mamba4rec", "tim4rec"])
    ml.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ml.add_argument("--epochs", type=int, default=5)
    ml.add_argument("--patience", type=int, default=2)
    ml.add_argument("--batch-size", type=int, default=256)
    ml.add_argument("--lr", type=float, default=1e-3)
    ml.add_argument("--out-dir", default=str(ROOT / "runs" / "bench-recsys"))
    ml.add_argument("--fresh", action="store_true", help="ignore finished runs in the JSON")
    ml.add_argument("--out", default=None, help="result file stem in benchmarks/results/ (default "
                                                "recsys_ml100k_<times>)")
    ml.add_argument("--times", choices=sorted(TIME_MODES), default="exact",
                    help="exact: exact times, ties by (user, item) hash (the recipes' default); recbole: float32 "
                         "times, ties in file order")
    ml.add_argument("--max-len", type=int, default=None, help="override the recipes' max length (200)")
    ml.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; 1 is faster on a crowded machine)")
    mg = sub.add_parser("merge", help="combine ml100k result files (e.g. seeds run in parallel) into one table")
    mg.add_argument("parts", nargs="+", help="result file stems in benchmarks/results/")
    mg.add_argument("--out", default="recsys_ml100k")
    args = parser.parse_args()
    if args.part == "speed":
        result = run_speed(args)
        _write(result, args.out, speed_markdown(result))
    elif args.part == "merge":
        result = merge_ml100k(args)
        _write(result, args.out, ml100k_markdown(result))
    else:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        args.out = args.out or f"recsys_ml100k_{args.times}"
        result = run_ml100k(args)
        _write(result, args.out, ml100k_markdown(result))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
