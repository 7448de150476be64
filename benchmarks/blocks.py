"""Mamba block benchmarks (CPU): mambakit's `Mamba` mixer against mambapy 1.2.0's `MambaBlock`, in one run.

1. Block forward+backward at the same config and weights (mambapy's parallel scan `pscan=True`, its default):
   Vim-Ti width (d_model=192, L=197, b=8) and d_model=768, L=1024, b=4 (d_state=16, expand=2, d_conv=4).
   Also forward alone, and mambakit's bidirectional Vim mixer (`MultiOrderMamba.vim`) at Vim-Ti for scale.
2. Token-by-token decoding: `Mamba.step()` against re-running `forward` on the growing prefix (the cost of a
   model without a recurrent mode) and against mambapy's `MambaBlock.step`.
3. Peak memory at L=100000 (and L=10000, where mambapy fits) (b=1, d_model=256): forward (no grad) and forward+backward, each case in a fresh
   subprocess; peak = the process's RSS high-water mark (VmHWM, reset just before the call through
   /proc/self/clear_refs; ru_maxrss where that is unavailable) minus its RSS just before the measured call, so
   it counts everything the call allocated, whichever allocator. Subprocesses run under an address
   space limit (default 8 GiB, kind to a shared machine) so that a peer that needs more fails alone and is reported as such.
4. `--parts mixers`: mambakit's mixers alone at the shapes where layout costs show (no peer; run it on two
   checkouts with PYTHONPATH=<checkout> from outside the repository to compare versions): a Vim-Ti mixer at
   1024 px (`MultiOrderMamba.vim(192)`, b=1, L=4097), MambaMIL's SR-Mamba (`MultiOrderMamba.sr(512, rate=10)`,
   b=1, L=10000; also with memory_efficient=True) and `Mamba(192)` at b=8, L=197; forward (no grad) and
   forward+backward (a fixed random output gradient), wall and process CPU time (the steadier one on a shared
   machine at one thread), plus the top operators of one forward and one forward+backward under torch.profiler.

Timings: median over repeats after a warm-up, torch.get_num_threads() threads, float32. Writes
benchmarks/results/blocks.json and blocks.md (blocks_<parts>.* for a subset of the parts, so that a partial run
leaves the full run's files alone). Usage: python benchmarks/blocks.py [--quick] [--parts ...].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg_start": os.getloadavg()}


def scan_backend_in_use() -> str:
    from mambakit.core import scan
    if "cpu" not in scan.available_backends():
        return "reference"
    try:
        from mambakit.kernels.cpu_scan import kernel_status
    except ImportError:
        return "cpu"
    ok, why = kernel_status(torch.float32)
    return "cpu (fused kernel)" if ok else f"cpu unavailable, reference fallback ({why})"


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_wall_and_cpu(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall and median process CPU seconds per call (CPU time is the steadier figure on a shared machine
    when torch runs one thread)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def make_pair(d_model: int, seed: int = 0):
    """mambakit Mamba and mambapy MambaBlock with identical weights (mambapy keeps mamba_ssm's names)."""
    from mambapy.mamba import MambaBlock, MambaConfig
    from mambakit.core import Mamba
    torch.manual_seed(seed)
    ours = Mamba(d_model, d_state=16, d_conv=4, expand=2)
    peer = MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=16, expand_factor=2, d_conv=4, pscan=True))
    peer.load_state_dict(ours.state_dict(), strict=True)
    return ours, peer


def bench_block(shapes, repeats: int) -> list[dict]:
    from mambakit.core import MultiOrderMamba
    rows = []
    for name, b, L, d in shapes:
        ours, peer = make_pair(d)
        x = torch.randn(b, L, d)
        with torch.no_grad():
            diff = (ours(x) - peer(x)).abs().max().item()

        def fwd_bwd(m):
            def run():
                xx = x.clone().requires_grad_(True)
                m(xx).sum().backward()
            return run

        def fwd(m):
            def run():
                with torch.no_grad():
                    m(x)
            return run

        row = {"case": name, "batch": b, "length": L, "d_model": d, "max_abs_diff_vs_mambapy": diff}
        row["fwd_bwd_ours_s"] = timeit(fwd_bwd(ours), repeats)
        row["fwd_bwd_mambapy_s"] = timeit(fwd_bwd(peer), repeats)
        row["fwd_ours_s"] = timeit(fwd(ours), repeats)
        row["fwd_mambapy_s"] = timeit(fwd(peer), repeats)
        if d == 192:
            vim = MultiOrderMamba.vim(d)
            row["fwd_bwd_ours_vim_bidirectional_s"] = timeit(fwd_bwd(vim), repeats)
        row["fwd_bwd_speedup"] = row["fwd_bwd_mambapy_s"] / row["fwd_bwd_ours_s"]
        row["fwd_speedup"] = row["fwd_mambapy_s"] / row["fwd_ours_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


ALL_PARTS = ("block", "decode", "memory", "mixers")
MIXER_CASES = [("Vim-Ti mixer, 1024 px", "vim", 1, 4097, 192), ("SR-Mamba (MambaMIL)", "sr", 1, 10000, 512),
               ("SR-Mamba (MambaMIL), memory_efficient", "sr_lean", 1, 10000, 512),
               ("Mamba, Vim-Ti width", "mamba", 8, 197, 192)]
QUICK_MIXER_CASES = [("Vim-Ti mixer (quick)", "vim", 1, 257, 192), ("SR-Mamba (quick)", "sr", 1, 503, 64),
                     ("SR-Mamba, memory_efficient (quick)", "sr_lean", 1, 503, 64),
                     ("Mamba (quick)", "mamba", 2, 33, 192)]


def make_mixer(kind: str, d_model: int, seed: int = 0):
    from mambakit.core import Mamba, MultiOrderMamba
    torch.manual_seed(seed)
    if kind == "vim":                       # Vim's settings: bimamba v2, if_divide_out=True, d_state 16, expand 2
        return MultiOrderMamba.vim(d_model, d_state=16, d_conv=4, expand=2)
    if kind in ("sr", "sr_lean"):           # MambaMIL's SRMamba layer (sr_lean: recompute in the backward)
        return MultiOrderMamba.sr(d_model, rate=10, d_state=16, d_conv=4, expand=2,
                                  memory_efficient=kind == "sr_lean")
    return Mamba(d_model, d_state=16, d_conv=4, expand=2)


def bench_mixers(cases, repeats: int, profile_top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    rows = []
    for name, kind, b, L, d in cases:
        m = make_mixer(kind, d)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(b, L, d, generator=gen)
        g = torch.randn(b, L, d, generator=gen)

        def fwd():
            with torch.no_grad():
                m(x)

        def fwd_bwd():
            xx = x.clone().requires_grad_(True)
            m(xx).backward(g)

        row = {"case": name, "mixer": kind, "batch": b, "length": L, "d_model": d}
        for key, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            row[f"{key}_s"], row[f"{key}_cpu_s"] = timeit_wall_and_cpu(fn, repeats)
        for key, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events) or 1.0
            row[f"profile_{key}_top"] = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6,
                                          "share": e.self_cpu_time_total / total, "calls": e.count}
                                         for e in events[:profile_top]]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("profile_")}), flush=True)
    return rows


def bench_decode(d_model: int, batch: int, tokens: int, repeats: int) -> dict:
    ours, peer = make_pair(d_model)
    x = torch.randn(batch, tokens, d_model)

    @torch.no_grad()
    def step_loop():
        conv, ssm = ours.allocate_inference_cache(batch, tokens)
        for t in range(tokens):
            ours.step(x[:, t:t + 1], conv, ssm)

    @torch.no_grad()
    def growing_prefix():
        for t in range(tokens):
            ours(x[:, : t + 1])

    @torch.no_grad()
    def mambapy_step():
        ed = peer.config.d_inner
        cache = (torch.zeros(batch, ed, 16), torch.zeros(batch, ed, 3))
        for t in range(tokens):
            _, cache = peer.step(x[:, t], cache)

    with torch.no_grad():                              # the recurrence reproduces the parallel forward
        conv, ssm = ours.allocate_inference_cache(batch, tokens)
        stepped = torch.cat([ours.step(x[:, t:t + 1], conv, ssm)[0] for t in range(tokens)], 1)
        diff = (stepped - ours(x)).abs().max().item()
    row = {"d_model": d_model, "batch": batch, "tokens": tokens, "max_abs_diff_step_vs_forward": diff}
    for key, fn in (("step", step_loop), ("growing_prefix_forward", growing_prefix), ("mambapy_step", mambapy_step)):
        t = timeit(fn, repeats, warmup=1)
        row[f"{key}_s"] = t
        row[f"{key}_tokens_per_s"] = batch * tokens / t
    row["step_vs_prefix_speedup"] = row["growing_prefix_forward_s"] / row["step_s"]
    row["step_vs_mambapy_step_speedup"] = row["mambapy_step_s"] / row["step_s"]
    print(json.dumps(row), flush=True)
    return row


_MEMORY_CHILD = r"""
import json, resource, sys, torch
impl, mode, b, L, d = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
sys.path.insert(0, sys.argv[6])
from blocks import make_pair
ours, peer = make_pair(d)
m = ours if impl == "mambakit" else peer
x = torch.randn(b, L, d)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
try:                      # reset the high-water mark (Linux >= 4.0) so that imports and setup do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
before = rss_now()
if mode == "forward":
    with torch.no_grad():
        m(x)
else:
    xx = x.clone().requires_grad_(True)
    m(xx).sum().backward()
peak = status("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_bytes": peak - before}))
"""


def memory_case(impl: str, mode: str, b: int, L: int, d: int, limit_gib: float, timeout: int) -> dict:
    def limit():
        cap = int(limit_gib * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    cmd = [sys.executable, "-c", _MEMORY_CHILD, impl, mode, str(b), str(L), str(d), str(Path(__file__).parent)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "mode": mode, "status": f"timeout > {timeout} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        status = f"failed under the {limit_gib:g} GiB address-space cap" if "alloc" in proc.stderr.lower() \
            or "memory" in proc.stderr.lower() else f"failed: {tail}"
        return {"impl": impl, "mode": mode, "status": status}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"impl": impl, "mode": mode, "status": "ok", "peak_mib": out["peak_bytes"] / 2 ** 20, "wall_s": wall}


def bench_memory(b: int, lengths: list[int], d: int, limit_gib: float, timeout: int) -> list[dict]:
    rows = []
    for L in lengths:
        for mode in ("forward", "forward+backward"):
            for impl in ("mambakit", "mambapy"):
                row = {"batch": b, "length": L, "d_model": d, **memory_case(impl, mode, b, L, d, limit_gib, timeout)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    with_peer = any(result.get(part) for part in ("block", "decode", "memory"))
    parts = result.get("parts", list(ALL_PARTS))
    command_parts = "" if set(parts) == set(ALL_PARTS) else " --parts " + ",".join(parts)
    lines = [
        "## Mamba block (CPU): mambakit vs mambapy 1.2.0" if with_peer else "## mambakit mixers (CPU)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
        f"load average {m['load_avg_start'][0]:.2f} at start, {result['load_avg_end'][0]:.2f} at end. "
        f"mambakit's selective-scan backend: `{result['scan_backend']}`. float32, d_state=16, expand=2, d_conv=4"
        + ("; mambapy `MambaBlock` with its parallel scan (pscan=True) and the same weights. " if with_peer else ". ")
        + f"Generated by `python benchmarks/blocks.py{command_parts}`.",
        "",
    ]
    if result.get("block"):
        lines += ["### Forward + backward (median seconds; speedup = mambapy / mambakit)", "",
                  "| case | b | L | d_model | mambakit fwd+bwd | mambapy fwd+bwd | speedup | mambakit fwd | mambapy fwd "
                  "| speedup | max abs diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["block"]:
            lines.append(f"| {r['case']} | {r['batch']} | {r['length']} | {r['d_model']} | {r['fwd_bwd_ours_s']:.4f} "
                         f"| {r['fwd_bwd_mambapy_s']:.4f} | {r['fwd_bwd_speedup']:.2f}x | {r['fwd_ours_s']:.4f} "
                         f"| {r['fwd_mambapy_s']:.4f} | {r['fwd_speedup']:.2f}x | {r['max_abs_diff_vs_mambapy']:.1e} |")
        vim = [r for r in result["block"] if "fwd_bwd_ours_vim_bidirectional_s" in r]
        for r in vim:
            lines += ["", f"mambakit's bidirectional Vim mixer (`MultiOrderMamba.vim`, two scans) at {r['case']}: "
                          f"{r['fwd_bwd_ours_vim_bidirectional_s']:.4f} s forward+backward (no mambapy peer)."]
        lines.append("")
    if result.get("decode"):
        r = result["decode"]
        lines += [f"### Token-by-token decoding (d_model={r['d_model']}, batch {r['batch']}, {r['tokens']} tokens, "
                  "no grad)", "",
                  "| method | seconds | tokens/s | mambakit step() speedup |", "|---|---|---|---|",
                  f"| mambakit `step()` | {r['step_s']:.3f} | {r['step_tokens_per_s']:.0f} | 1.00x |",
                  f"| mambakit `forward` on the growing prefix | {r['growing_prefix_forward_s']:.3f} | "
                  f"{r['growing_prefix_forward_tokens_per_s']:.0f} | {r['step_vs_prefix_speedup']:.2f}x |",
                  f"| mambapy `MambaBlock.step` | {r['mambapy_step_s']:.3f} | {r['mambapy_step_tokens_per_s']:.0f} | "
                  f"{r['step_vs_mambapy_step_speedup']:.2f}x |", "",
                  f"step() outputs equal the parallel forward to {r['max_abs_diff_step_vs_forward']:.1e} (float32).", ""]
    if result.get("memory"):
        rows = result["memory"]
        r0 = rows[0]
        lines += [f"### Peak memory (b={r0['batch']}, d_model={r0['d_model']}; RSS high-water minus RSS before the "
                  f"call, fresh process per case, {result['memory_limit_gib']:g} GiB address-space cap)", "",
                  "| L | mode | mambakit | mambapy | ratio (mambapy / mambakit) |", "|---|---|---|---|---|"]
        fmt = lambda r: f"{r['peak_mib']:.0f} MiB" if r["status"] == "ok" else r["status"]
        for L in sorted({r["length"] for r in rows}):
            for mode in ("forward", "forward+backward"):
                ours = next(r for r in rows if r["mode"] == mode and r["impl"] == "mambakit" and r["length"] == L)
                peer = next(r for r in rows if r["mode"] == mode and r["impl"] == "mambapy" and r["length"] == L)
                ok = ours["status"] == peer["status"] == "ok"
                ratio = f"{peer['peak_mib'] / ours['peak_mib']:.1f}x" if ok else "-"
                lines.append(f"| {L} | {mode} | {fmt(ours)} | {fmt(peer)} | {ratio} |")
        lines.append("")
    if result.get("mixers"):
        lines += ["### mambakit mixers alone (median seconds, wall / process CPU; float32, no peer)", "",
                  "| case | b | L | d_model | fwd wall | fwd CPU | fwd+bwd wall | fwd+bwd CPU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["mixers"]:
            lines.append(f"| {r['case']} | {r['batch']} | {r['length']} | {r['d_model']} | {r['fwd_s']:.4f} "
                         f"| {r['fwd_cpu_s']:.4f} | {r['fwd_bwd_s']:.4f} | {r['fwd_bwd_cpu_s']:.4f} |")
        for r in result["mixers"]:
            for key, what in (("fwd", "forward (no grad)"), ("fwd_bwd", "forward+backward")):
                lines += ["", f"Top operators of one {what}, {r['case']} (torch.profiler, self CPU time):", "",
                          "| op | self s | share | calls |", "|---|---|---|---|"]
                lines += [f"| `{e['op']}` | {e['self_s']:.4f} | {100 * e['share']:.1f}% | {e['calls']} |"
                          for e in r[f"profile_{key}_top"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, to check that the script runs")
    ap.add_argument("--parts", default=",".join(ALL_PARTS),
                    help="comma-separated subset of block,decode,memory,mixers")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-limit-gib", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine(), "scan_backend": scan_backend_in_use(), "quick": args.quick,
              "parts": [p for p in ALL_PARTS if p in parts]}
    if args.quick:
        shapes = [("Vim-Ti (quick)", 2, 33, 192)]
        decode = (64, 2, 16)
        mem = (1, [500, 2000], 64, 600)
    else:
        shapes = [("Vim-Ti", 8, 197, 192), ("d768 L1024", 4, 1024, 768)]
        decode = (768, 4, 256)
        mem = (1, [10_000, 100_000], 256, 3600)
    if "block" in parts:
        result["block"] = bench_block(shapes, args.repeats)
    if "decode" in parts:
        result["decode"] = bench_decode(*decode, repeats=max(1, args.repeats // 2))
    if "mixers" in parts:
        result["mixers"] = bench_mixers(QUICK_MIXER_CASES if args.quick else MIXER_CASES, args.repeats)
    if "memory" in parts:
        b, lengths, d, timeout = mem
        result["memory_limit_gib"] = args.memory_limit_gib
        result["memory"] = bench_memory(b, lengths, d, args.memory_limit_gib, timeout)
    result["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "blocks_quick" if args.quick else "blocks"
    if parts != set(ALL_PARTS):                   # a partial run does not overwrite the full run's results
        stem += "_" + "_".join(sorted(parts))
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
