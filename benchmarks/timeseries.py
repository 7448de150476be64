"""S-Mamba's efficiency claim, measured: forward + backward time and peak memory of one training step of
S-Mamba against iTransformer as the number of variates (= tokens) grows: 7 (ETT), 321 (electricity),
862 (traffic), 2000 and 5000 (synthetic), with the ratio iTransformer / S-Mamba from the same run.

    .venv/bin/python benchmarks/timeseries.py                   # CPU, 2 threads, batch 1
    .venv/bin/python benchmarks/timeseries.py --device cuda --batch 16

Every (model, variates) point runs in a fresh process, so that its peak memory is its own: on CPU the peak
resident set size of that process during one step minus its size just before it (Linux `VmHWM` after
resetting it through /proc/self/clear_refs); on CUDA `torch.cuda.max_memory_allocated`. Time is the median
over repeats after one warm-up step. Both models use the same width, depth, lookback and horizon
(defaults: d_model = d_ff = 256, 2 layers, lookback = horizon = 96, S-Mamba d_state 16, iTransformer 8
heads), no calendar tokens, training mode (dropout on). Writes benchmarks/results/timeseries_scaling.{json,md}.
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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIATES = (7, 321, 862, 2000, 5000)
MODELS = ("smamba", "itransformer")
TITLES = {"smamba": "S-Mamba", "itransformer": "iTransformer"}


def _vm_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(model_name: str, n_variates: int, args) -> dict:
    """One point, in this process: returns times (s) and peak memory (MiB)."""
    import torch

    from mambakit.apps.timeseries.models import ITransformer, SMamba

    torch.manual_seed(0)
    device = torch.device(args.device)
    if model_name == "smamba":
        model = SMamba(args.seq_len, args.pred_len, d_model=args.d_model, d_ff=args.d_ff, e_layers=args.e_layers,
                       d_state=args.d_state)
    else:
        model = ITransformer(args.seq_len, args.pred_len, d_model=args.d_model, d_ff=args.d_ff,
                             e_layers=args.e_layers, n_heads=args.n_heads)
    model = model.to(device).train()
    x = torch.randn(args.batch, args.seq_len, n_variates, device=device)
    target = torch.randn(args.batch, args.pred_len, n_variates, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # peak memory of one step (the first one also allocates the gradients, as in training)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        how = "cuda max_memory_allocated - allocated before the step"
    else:
        resettable = _reset_peak_rss()
        base = _vm_kib("VmRSS")
        step()
        peak = _vm_kib("VmHWM")
        peak_mib = (peak - base) / 1024 if (resettable and base is not None and peak is not None) else None
        how = "VmHWM - VmRSS before the step (peak reset via clear_refs)" if resettable else "unavailable"
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"model": model_name, "variates": n_variates, "time_s": statistics.median(times), "times_s": times,
            "peak_mib": peak_mib, "memory_method": how,
            "params": sum(p.numel() for p in model.parameters())}


def run_point(model_name: str, n_variates: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_point", f"{model_name}:{n_variates}",
           "--device", args.device, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--pred-len", str(args.pred_len), "--d-model", str(args.d_model), "--d-ff", str(args.d_ff),
           "--e-layers", str(args.e_layers), "--d-state", str(args.d_state), "--n-heads", str(args.n_heads),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"model": model_name, "variates": n_variates, "error": proc.stderr.strip().splitlines()[-1:]
                or [f"exit {proc.returncode}"], "wall_s": time.time() - started}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(args) -> dict:
    info = {"python": platform.python_version(), "cpus_visible": os.cpu_count(), "threads": args.threads,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    try:
        import torch

        info["torch"] = torch.__version__
        if args.device == "cuda":
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    return info


def markdown(points: list[dict], meta: dict) -> str:
    a = meta["args"]
    lines = [
        "# S-Mamba vs iTransformer: one training step as the number of variates grows",
        "",
        f"Generated by `benchmarks/timeseries.py` on {meta['generated']} ({meta['machine'].get('cpu', '?')}, "
        f"device {a['device']}, {a['threads']} threads, torch {meta['machine'].get('torch', '?')}; load average at "
        f"start {meta['machine'].get('loadavg_start')}). Batch {a['batch']}, lookback {a['seq_len']}, horizon "
        f"{a['pred_len']}, d_model {a['d_model']}, d_ff {a['d_ff']}, {a['e_layers']} layers, S-Mamba d_state "
        f"{a['d_state']}, iTransformer {a['n_heads']} heads, training mode. Time: median forward + backward over "
        f"{a['repeats']} steps. Memory: peak extra memory of one step ({points[0].get('memory_method', '?') if points else ''}).",
        "",
        "| variates | S-Mamba time | iTransformer time | time ratio (iTr / S-Mamba) | S-Mamba peak MiB | "
        "iTransformer peak MiB | memory ratio (iTr / S-Mamba) |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(p["model"], p["variates"]): p for p in points}
    for n in a["variates"]:
        s, t = by.get(("smamba", n), {}), by.get(("itransformer", n), {})

        def fmt_time(p):
            return f"{p['time_s'] * 1000:.1f} ms" if "time_s" in p else f"failed: {p.get('error')}"

        def fmt_mem(p):
            return f"{p['peak_mib']:.0f}" if p.get("peak_mib") is not None else "-"

        tr = f"{t['time_s'] / s['time_s']:.2f}" if "time_s" in s and "time_s" in t else "-"
        mr = (f"{t['peak_mib'] / s['peak_mib']:.2f}" if s.get("peak_mib") and t.get("peak_mib") else "-")
        lines.append(f"| {n} | {fmt_time(s)} | {fmt_time(t)} | {tr} | {fmt_mem(s)} | {fmt_mem(t)} | {mr} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variates", default=",".join(map(str, VARIATES)))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--pred-len", type=int, default=96)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--e-layers", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per point")
    p.add_argument("--results", default=str(RESULTS / "timeseries_scaling"), help="output prefix (.json, .md)")
    p.add_argument("--_point", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._point:
        import torch

        torch.set_num_threads(args.threads)
        name, n = args._point.split(":")
        print(json.dumps(measure(name, int(n), args)))
        return 0

    variates = [int(v) for v in args.variates.split(",")]
    meta = {"generated": datetime.now().isoformat(timespec="seconds"), "machine": machine(args),
            "args": {**{k: v for k, v in vars(args).items() if not k.startswith("_")}, "variates": variates}}
    points = []
    for n in variates:
        for name in MODELS:
            point = run_point(name, n, args)
            points.append(point)
            shown = f"{point['time_s'] * 1000:.1f} ms, peak {point['peak_mib']} MiB" if "time_s" in point \
                else f"failed: {point['error']}"
            print(f"{TITLES[name]:>12} {n:>5} variates: {shown}", flush=True)
    meta["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    prefix = Path(args.results)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "points": points}, indent=1) + "\n")
    prefix.with_suffix(".md").write_text(markdown(points, meta))
    print(markdown(points, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
