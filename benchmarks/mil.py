"""MIL at whole-slide scale on the CPU: forward+backward time and peak memory for one bag, MambaMIL
(SR-Mamba, R=5, 2 layers; also with activation checkpointing per block, and with core's memory-efficient
mixers) against TransMIL (Nystrom attention) and ABMIL (gated attention), at 1k, 10k, 50k and 100k instances
of 1024-d features, with the ratios from one run.

    .venv/bin/python benchmarks/mil.py            # writes benchmarks/results/mil.{json,md}, prints the table
    .venv/bin/python benchmarks/mil.py --quick    # small bags: checks the script in a minute

Method
- Every (model, bag size) runs in its own subprocess, so each peak comes from a clean process and an
  out-of-memory kill stays contained. The parent watches the child's resident memory and stops it above
  --limit-gib (default 20 of the machine's 24 GiB); such a case, or one the kernel kills, is reported as
  out of memory at that size, and larger bags of that model are not tried.
- One step = model(bag) -> cross-entropy on a 2-class label -> backward() into every parameter, in float32,
  train mode, batch size 1 (how MIL trains). Models are built as the MambaMIL repository builds them
  (MambaMIL(1024, 2, dropout 0, gelu, layer 2, rate 5); TransMIL(1024, 2); gated ABMIL(1024, 2)).
- Warm-up: one step on a 1,000-instance bag first (first-call costs: the fused scan kernel's load, the
  allocator), then the timed steps: the median of 3 for bags up to 10k instances, one step above.
- Memory: peak resident set size above the resident size just before the measured step (the kernel's
  high-water mark is reset through /proc/self/clear_refs, then VmHWM - VmRSS is read from
  /proc/self/status). It counts activations, autograd buffers and gradients; the bag and the weights are
  allocated before.
- malloc: each child applies what the `mambakit` command does (`mambakit.runtime.configure_malloc`: blocks
  up to 32 MiB from glibc's heap, kept for reuse; MAMBAKIT_MALLOC=default opts out), the same for every
  model. Blocks above that (a 100k-instance bag's activations) are mapped fresh when allocated. With
  MAMBAKIT_MALLOC=default, glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_=65536) so freed large
  buffers return to the OS between steps.
- Threads: torch's default (all cores). The machine's load average is recorded at the start and the end;
  compare numbers only within one run. `--rounds R` repeats every case R times, alternating the model
  order, and takes each ratio within a round (back-to-back cases), reporting the median and the range.
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

import measure  # benchmarks/measure.py, next to this script
import rounds  # benchmarks/rounds.py

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MODELS = {"mambamil": "MambaMIL (SR-Mamba)", "mambamil_ckpt": "MambaMIL, checkpointed blocks",
          "mambamil_lean": "MambaMIL, memory-efficient mixers",
          "transmil": "TransMIL (Nystrom)", "abmil": "ABMIL (gated)"}
SIZES = [1000, 10000, 50000, 100000]
QUICK_SIZES = [500, 2000]
IN_DIM = 1024


# --------------------------------------------------------------------------------------------------
# child: one (model, size)

def _build(name: str):
    from mambakit.apps.pathology.models import ABMIL, MambaMIL, TransMIL

    if name in ("mambamil", "mambamil_ckpt", "mambamil_lean"):
        from mambakit.core import set_memory_efficient

        model = MambaMIL(in_dim=IN_DIM, n_classes=2, dropout=0.0, act="gelu", layer=2, rate=5,
                         checkpoint_layers=name == "mambamil_ckpt")
        if name == "mambamil_lean":      # core's recompute-in-backward path: same values, less memory held
            set_memory_efficient(model)
        return model
    if name == "transmil":
        return TransMIL(in_dim=IN_DIM, n_classes=2, dropout=0.0, act="relu")
    if name == "abmil":
        return ABMIL(in_dim=IN_DIM, n_classes=2, gated=True)
    raise ValueError(name)


def child(name: str, size: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from mambakit.runtime import configure_malloc

    configure_malloc()
    torch.manual_seed(0)
    model = _build(name).train()
    label = torch.tensor([1])

    def step(bag):
        loss = F.cross_entropy(model(bag), label)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(torch.randn(1000, IN_DIM))                      # warm-up
    bag = torch.randn(size, IN_DIM)
    rss_before = measure.status_kib("VmRSS")
    measure.reset_peak()
    start = time.perf_counter()
    step(bag)
    times = [time.perf_counter() - start]
    peak_kib = measure.status_kib("VmHWM") - rss_before
    for _ in range(repeats - 1):
        start = time.perf_counter()
        step(bag)
        times.append(time.perf_counter() - start)
    return {"model": name, "size": size, "status": "ok", "time_s": statistics.median(times), "times_s": times,
            "peak_gib": peak_kib / 2**20, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------
# parent

def run_case(name: str, size: int, limit_gib: float, timeout_s: float) -> dict:
    repeats = 3 if size <= 10000 else 1
    cmd = [sys.executable, __file__, "--child", name, str(size), "--repeats", str(repeats)]
    return {"model": name, "size": size, **measure.run_child(cmd, ROOT, limit_gib, timeout_s)}


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    from mambakit.runtime import configure_malloc, huge_pages_note, malloc_note

    configure_malloc()                                   # what the children do, so that the note says it
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit, "huge_pages": huge_pages_note(),
            "malloc": malloc_note()}


def _fmt(r: dict | None, key: str, digits: int) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return {"oom": "OOM", "timeout": "timeout", "skipped": "skipped"}.get(r["status"], "error")
    return f"{r[key]:.{digits}f}"


def _key(r: dict) -> tuple:
    return r["model"], r["size"]


def table(results: list[dict], sizes: list[int]) -> str:
    """One row per (bag size, model); the ratios compare TransMIL with the row's model (> 1: the row's
    model is faster / leaner). With several rounds: median time and largest peak over the rounds, and the
    median (range) of the ratios taken within each round."""
    ok = [r for r in results if r["status"] == "ok"]
    merged = rounds.merge_rounds(ok, _key, "time_s", "peak_gib")
    by = {**{_key(r): r for r in results if r["status"] != "ok"}, **merged}
    models = list(dict.fromkeys(r["model"] for r in results))
    lines = ["| instances | model | fwd+bwd s | peak GiB | TransMIL time / this | TransMIL memory / this |",
             "|---|---|---|---|---|---|"]
    for n in sizes:
        for name in models:
            r = by.get((name, n))
            if r is None:
                continue
            ratios = [rounds.format_ratio(rounds.paired_ratio(ok, _key, k, ("transmil", n), (name, n)))
                      for k in ("time_s", "peak_gib")]
            lines.append(f"| {n:,} | {MODELS[name]} | {_fmt(r, 'time_s', 3 if r.get('time_s', 1) < 1 else 2)} | "
                         f"{_fmt(r, 'peak_gib', 3)} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from mambakit.runtime import prefer_huge_pages

    prefer_huge_pages()                      # as the `mambakit` command; the model processes inherit it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help=f"bags of {QUICK_SIZES} (a check of the script)")
    parser.add_argument("--sizes", default=None, help="comma-separated bag sizes (default 1000,10000,50000,100000)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: mambamil,transmil,abmil")
    parser.add_argument("--limit-gib", type=float, default=20.0, help="stop a case above this resident memory")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="stop a case after this long")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/mil[_quick])")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every case, alternating the model order; ratios are taken within a round")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats)))
        return 0
    sizes = QUICK_SIZES if args.quick else ([int(s) for s in args.sizes.split(",")] if args.sizes else SIZES)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    info = machine() | {"load_average_start": os.getloadavg()}
    results, failed_at = [], {}
    for rnd in range(args.rounds):
        for n in sizes:
            for name in rounds.alternate(models, rnd):
                if name in failed_at:
                    results.append({"model": name, "size": n, "status": "skipped", "round": rnd,
                                    "detail": f"{failed_at[name]['status']} at {failed_at[name]['size']:,} instances"})
                    continue
                r = {**run_case(name, n, args.limit_gib, args.timeout_s), "round": rnd}
                results.append(r)
                if r["status"] != "ok":
                    failed_at[name] = r
                shown = (f"{r['time_s']:.2f} s, {r['peak_gib']:.2f} GiB" if r["status"] == "ok"
                         else r.get("detail", r["status"]))
                print(f"{MODELS[name]:<22} {n:>7,} instances{f' round {rnd + 1}' if args.rounds > 1 else ''}: "
                      f"{shown}", flush=True)
    info["load_average_end"] = os.getloadavg()
    stem = Path(args.out) if args.out else RESULTS / ("mil_quick" if args.quick else "mil")
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = table(results, sizes)
    notes = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; torch {info['torch']}; "
             f"commit {info['commit']}; load average {info['load_average_start'][0]:.2f} at the start, "
             f"{info['load_average_end'][0]:.2f} at the end; {info['huge_pages']}; "
             f"{info.get('malloc', 'malloc setting not recorded')}.",
             "One bag, forward + backward, float32, train mode; peak = resident memory above the level before "
             "the step. See benchmarks/mil.py for the method."
             + (f" {args.rounds} rounds, the model order alternating: times are medians over the rounds, "
                f"ratios the median (range) of the ratios within each round." if args.rounds > 1 else "")]
    for r in results:
        if r["status"] != "ok":
            notes.append(f"- {MODELS[r['model']]} at {r['size']:,} instances: {r['status']} ({r.get('detail', '')})")
    (stem.with_suffix(".json")).write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    (stem.with_suffix(".md")).write_text(md + "\n\n" + "\n".join(notes) + "\n")
    print("\n" + md + "\n\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
