"""CPU benchmark of the selective scan: mambakit's fused kernel against the reference loop (ours), an
upstream-style reference (mamba_ssm's `selective_scan_ref` formulation) and mambapy 1.2.0's parallel scan,
forward and forward+backward, time and peak memory, at issue 3's shapes. One command:

    .venv/bin/python benchmarks/scan.py              # writes benchmarks/results/scan_cpu.{json,md}, prints the table
    .venv/bin/python benchmarks/scan.py --quick      # tiny shapes: checks the script in seconds
    .venv/bin/python benchmarks/scan.py --chunk-sweep   # also times the kernel's checkpoint interval K

Method
- Every (shape, peer) runs in its own subprocesses (one timing, one memory). All peers
  compute the same function (softplus(delta + delta_bias) steps, D skip, z gate) in float32 on the same
  values, each in its native layout (mambapy: (batch, length, channels)); the layout change is not timed.
  Before timing, each peer's output and gradients are compared with the fused kernel's (relative error
  reported as `check`).
- Time: wall-clock median (and min) over repeats after a warm-up call (the kernel's first-call compile is
  excluded); "fwd" runs under torch.no_grad(), "fwd+bwd" is the forward with autograd plus
  backward(ones) into every input.
- Memory: peak resident set size above the resident size just before the call, for the first call at the
  shape (a separate subprocess warms up on a tiny shape first: imports, the kernel's compile): it resets
  the kernel's high-water mark (`/proc/self/clear_refs` = 5), runs the call, and reads VmHWM - VmRSS(before)
  from /proc/self/status. RSS sees every allocation (torch's CPU allocator has no peak statistics, and the
  C kernel's own workspace is malloc'd outside torch). That subprocess pins glibc's mmap threshold
  (MALLOC_MMAP_THRESHOLD_=65536) so freed large buffers go back to the OS at once and fwd does not leave
  heap that fwd+bwd would reuse unseen; the timing subprocess does not (the pinned threshold makes every
  large allocation a fresh mmap, which slows allocation-heavy peers several-fold). The gradients returned
  by fwd+bwd are included (the same for every peer); the inputs are not.
- Peers that would run for hours or need more memory than the machine has are skipped with the reason
  (their time or memory is estimated from the shape; see `skip_reason`).
- Throughput: state updates per second = b * d * L * N / median time, next to the measured exp throughput
  per core: the kernel's vector exp (one thread, cache-resident, the function its decays use) and torch.exp
  on a 16M-element tensor with one thread and with all threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

# (name, b, d, L, N): issue 3's shapes
SHAPES = [
    ("vim_ti_layer", 8, 384, 197, 16),
    ("long_bag", 1, 1024, 20000, 16),
    ("recommendation", 256, 128, 50, 32),
    ("very_long", 1, 512, 100000, 16),
]
QUICK_SHAPES = [("tiny", 2, 16, 40, 8), ("tiny_long", 1, 8, 300, 4)]
PEERS = ["kernel", "reference", "upstream_ref", "mambapy"]
PEER_NAMES = {
    "kernel": "mambakit fused CPU kernel",
    "reference": "reference loop (ours)",
    "upstream_ref": "upstream-style reference",
    "mambapy": "mambapy 1.2.0 pscan",
}
CHUNKS = [16, 32, 64, 128, 256]
MIB = 1 << 20


# ------------------------------------------------------------------------------------------------------
# The peers (worker side)

def upstream_style_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """mamba_ssm's `selective_scan_ref` formulation (written from its published maths, float32): dA and
    dB*u materialised as (b, d, L, N) with einsum, then a Python loop that indexes step t of each."""
    import torch
    import torch.nn.functional as F
    delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    x = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2) + u * D[None, :, None]
    return y * F.silu(z)


def mambapy_scan(x, delta, A, B, C, D, z, delta_bias):
    """The selective-scan computation of mambapy's MambaBlock around its parallel scan, with the same step
    transform and gate as the others. x, delta, z: (b, L, d); B, C: (b, L, N)."""
    import torch.nn.functional as F
    from mambapy.pscan import pscan
    delta = F.softplus(delta + delta_bias)
    deltaA = (delta.unsqueeze(-1) * A).exp()                       # (b, L, d, N)
    BX = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)    # (b, L, d, N)
    hs = pscan(deltaA, BX)
    y = (hs @ C.unsqueeze(-1)).squeeze(3) + D * x
    return y * F.silu(z)


def make_inputs(b, d, L, N, seed=0):
    """Mamba-like values: steps softplus(delta + bias) around 0.05, A = -(1..N) (S4D-real init)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) * 0.5 - 3.0,
                A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1), B=torch.randn(b, N, L, generator=g),
                C=torch.randn(b, N, L, generator=g), D=torch.ones(d), z=torch.randn(b, d, L, generator=g),
                delta_bias=torch.rand(d, generator=g) * 0.5)


def peer_call(peer, inputs):
    """(leaves, fn): fn() returns the output in (b, d, L) layout computed from `leaves`."""
    from mambakit.core.scan import selective_scan
    from mambakit.kernels.reference import selective_scan_ref
    if peer == "mambapy":
        native = {k: (v.transpose(1, 2).contiguous() if k in ("u", "delta", "z", "B", "C") else v.clone())
                  for k, v in inputs.items()}
        native["x"] = native.pop("u")
        return native, lambda: mambapy_scan(**native).transpose(1, 2)
    leaves = {k: v.clone() for k, v in inputs.items()}
    if peer == "kernel":
        return leaves, lambda: selective_scan(**leaves, delta_softplus=True, backend="cpu")
    if peer == "reference":
        return leaves, lambda: selective_scan_ref(**leaves, delta_softplus=True)
    if peer == "upstream_ref":
        return leaves, lambda: upstream_style_ref(**leaves)
    raise ValueError(f"unknown peer {peer!r}")


# ------------------------------------------------------------------------------------------------------
# Measuring (worker side)

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn) -> int:
    """Peak RSS above the RSS before fn(), for one call."""
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                             # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def timed(fn, repeats: int, budget_s: float) -> dict:
    """Wall-clock median and min, and the median CPU time of the process (all its threads) per call."""
    fn()                                                         # warm-up
    times, cpu = [], []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if len(times) == 1 and times[0] > budget_s:
            break                                                # one call is all the budget allows
    return dict(median_s=statistics.median(times), min_s=min(times), cpu_median_s=statistics.median(cpu),
                repeats=len(times))


def run_case(shape, peer, modes, repeats, budget_s, chunk=None, memory=False) -> dict:
    """Timing (memory=False) or peak memory (memory=True) of one peer at one shape, for each mode."""
    import torch
    name, b, d, L, N = shape
    result = dict(shape=name, peer=peer, b=b, d=d, L=L, N=N, threads=torch.get_num_threads(), chunk=chunk)

    def calls(inputs):
        leaves, fn = peer_call(peer, inputs)
        if chunk is not None:
            from mambakit.kernels.cpu_scan import selective_scan_cpu
            fn = lambda: selective_scan_cpu(**leaves, delta_softplus=True, chunk=chunk)  # noqa: E731

        def forward():
            with torch.no_grad():
                fn()

        def forward_backward():
            for t in leaves.values():
                t.grad = None
            out = fn()
            out.backward(torch.ones_like(out))

        return leaves, {"fwd": forward, "fwdbwd": forward_backward}

    if memory:
        # Warm up (imports, the kernel's compile, one-time allocations) on a tiny shape, so the measured
        # call is the first at this shape: nothing reusable is left from an earlier call of the same size.
        tiny_leaves, tiny = calls(make_inputs(1, 8, 9, N))
        for mode in modes:
            for t in tiny_leaves.values():
                t.requires_grad_(mode == "fwdbwd")
            tiny[mode]()
    leaves, fns = calls(make_inputs(b, d, L, N))
    for mode in modes:
        for t in leaves.values():
            t.requires_grad_(mode == "fwdbwd")
        result[mode] = dict(peak_bytes=peak_bytes(fns[mode])) if memory else timed(fns[mode], repeats, budget_s)
    if not memory and peer != "kernel" and chunk is None and L <= 20000:
        result["check"] = check_against_kernel(peer, make_inputs(b, d, L, N), "fwdbwd" in modes)
    return result


def check_against_kernel(peer, inputs, with_grads: bool) -> float:
    """Largest relative difference (max |diff| / max |kernel|) of output and gradients vs the fused kernel."""
    import torch
    outs = []
    for p in ("kernel", peer):
        leaves, fn = peer_call(p, inputs)
        for t in leaves.values():
            t.requires_grad_(with_grads)
        out = fn()
        grads = {}
        if with_grads:
            out.backward(torch.ones_like(out))
            grads = {k: (v.grad.transpose(1, 2) if p == "mambapy" and k in ("u", "x", "delta", "z", "B", "C")
                         else v.grad) for k, v in leaves.items()}
            grads = {("u" if k == "x" else k): g for k, g in grads.items()}
        outs.append((out.detach(), grads))
    (ko, kg), (po, pg) = outs
    errs = [((po - ko).abs().max() / ko.abs().max()).item()]
    errs += [((pg[k] - kg[k]).abs().max() / kg[k].abs().max().clamp_min(1e-30)).item() for k in kg]
    return max(errs)


def exp_throughput() -> dict:
    import torch
    from mambakit.kernels.cpu_scan import vexp_bench
    n, reps = 4096, 20000
    kernel = statistics.median(n * reps / vexp_bench(n, reps) for _ in range(5))
    x = -torch.rand(1 << 24) * 10
    y = torch.empty_like(x)
    res = dict(kernel_vexp_per_core=kernel)
    old = torch.get_num_threads()
    for threads in (1, old):
        torch.set_num_threads(threads)
        torch.exp(x, out=y)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.exp(x, out=y)
            times.append(time.perf_counter() - t0)
        res[f"torch_exp_{threads}_threads"] = x.numel() / statistics.median(times)
    torch.set_num_threads(old)
    return res


# ------------------------------------------------------------------------------------------------------
# Orchestration (parent side)

def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def skip_reason(peer: str, shape, mode: str, avail: int) -> str | None:
    """Why a peer is not run at a shape: hours of runtime, or more memory than the machine has free.
    Estimates count float32 tensors of b*d*L*N elements (`full`) that each peer keeps alive at once."""
    name, b, d, L, N = shape
    full = 4 * b * d * L * N
    padded = 4 * b * d * N * 2 ** math.ceil(math.log2(max(L, 2)))
    if peer == "upstream_ref":
        if mode == "fwdbwd" and L > 1000:
            return (f"backward indexes dA[:, :, t] in a {L}-step loop: each step's backward zero-fills a "
                    f"{full / 2**30:.1f} GiB tensor ({L} x that: hours)")
        if 2 * full > avail / 2:
            return f"materialises dA and dB*u: {2 * full / 2**30:.1f} GiB, over half the free memory"
    if peer == "reference" and mode == "fwdbwd" and 6 * full > avail / 2:
        return f"autograd keeps ~6 (b, d, N) tensors per step: ~{6 * full / 2**30:.0f} GiB, over half the free memory"
    if peer == "mambapy":
        need = 2 * full + (2 if mode == "fwd" else 6) * padded
        if need > avail / 2:
            return (f"materialises (b, L, d, N) tensors padded to a power of two: ~{need / 2**30:.0f} GiB, over "
                    f"half the free memory")
    return None


def run_worker(args_list: list[str], timeout: float, memory: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if memory:                    # freed large buffers go back to the OS at once (only for the memory runs:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"      # it slows allocation-heavy peers down a lot)
    proc = subprocess.run([sys.executable, __file__, "--worker", *args_list], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        return dict(error=(proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def combine_rounds(rounds: list[dict], modes: list[str]) -> dict:
    """One result from several timing rounds: median of the medians, min of the mins, every round kept."""
    errors = [r["error"] for r in rounds if "error" in r]
    good = [r for r in rounds if "error" not in r]
    if not good:
        return dict(error=errors[0] if errors else "no rounds")
    res = {k: v for k, v in good[0].items() if k not in modes and k != "load"}
    for mode in modes:
        per = [r[mode] for r in good if mode in r]
        res[mode] = dict(median_s=statistics.median(p["median_s"] for p in per), min_s=min(p["min_s"] for p in per),
                         cpu_median_s=statistics.median(p["cpu_median_s"] for p in per),
                         repeats=sum(p["repeats"] for p in per), round_medians_s=[p["median_s"] for p in per])
    res["round_loads"] = [r.get("load") for r in good]
    if errors:
        res["error"] = errors[0]
    return res


def machine() -> dict:
    import torch
    from mambakit.kernels.cpu_scan import _compiler_version, _find_compiler, kernel_status
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), cpu=platform.processor())
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
        info["cpu"] = model[0] if model else info["cpu"]
        info["simd_flags"] = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in flags]
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["compiler"] = _compiler_version(_find_compiler())
    info["kernel_library"] = kernel_status()[1]
    from mambakit.runtime import huge_pages_note
    info["huge_pages"] = huge_pages_note()
    return info


def fmt_ms(r):
    return "—" if r is None else f"{r['median_s'] * 1e3:.1f}" if r["median_s"] < 10 else f"{r['median_s']:.1f} s"


def fmt_mib(r):
    if r is None:
        return "—"
    mib = r["peak_bytes"] / MIB
    return f"{mib:,.0f}" if mib >= 10 else f"{mib:.1f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores ({', '.join(m.get('simd_flags', []))}), "
             f"{m.get('mem_total_gib')} GiB; torch {m.get('torch')} with {m.get('torch_threads')} threads; "
             f"compiler {m.get('compiler')}; {m.get('huge_pages', 'huge pages not recorded')}. "
             f"Load average before/after: {report['load_before']} / "
             f"{report['load_after']}. float32; times are medians (ms unless marked s); peak = RSS above the "
             f"RSS before the call (MiB). Ratios: peer time / kernel time (and peer peak / kernel peak), "
             f"measured in the same run.", ""]
    head = ("| shape (b, d, L, N) | peer | fwd | fwd+bwd | fwd peak | fwd+bwd peak | kernel speed-up fwd | "
            "kernel speed-up fwd+bwd | peak ratio fwd+bwd | check |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for shape in report["shapes"]:
        name, b, d, L, N = shape
        rows = [r for r in report["results"] if r["shape"] == name and r.get("chunk") is None]
        kernel = next((r for r in rows if r["peer"] == "kernel"), {})
        for r in rows:
            def ratio(mode, key):
                k, p = kernel.get(mode), r.get(mode)
                if not k or not p:
                    return "—"
                if key == "time":
                    return f"{p['median_s'] / k['median_s']:,.1f}x"
                if k["peak_bytes"] < MIB:
                    return "—"                                    # below what RSS resolves usefully
                return f"{p['peak_bytes'] / k['peak_bytes']:,.1f}x"
            fwd, fb = r.get("fwd"), r.get("fwdbwd")
            skipped = "; ".join(f"{mode}: {why}" for mode, why in r.get("skipped", {}).items())
            check = "" if "check" not in r else f"{r['check']:.1e}"
            lines.append(f"| {name} ({b}, {d}, {L}, {N}) | {PEER_NAMES[r['peer']]} | {fmt_ms(fwd)} | {fmt_ms(fb)} | "
                         f"{fmt_mib(fwd)} | {fmt_mib(fb)} | "
                         f"{'' if r['peer'] == 'kernel' else ratio('fwd', 'time')} | "
                         f"{'' if r['peer'] == 'kernel' else ratio('fwdbwd', 'time')} | "
                         f"{'' if r['peer'] == 'kernel' else ratio('fwdbwd', 'mem')} | {check} |"
                         + (f" skipped: {skipped}" if skipped else "") + (f" error: {r['error']}" if "error" in r else ""))
    lines += ["", "State updates per second (b·d·L·N / median time) of the fused kernel, next to exp throughput "
              "(the kernel's vector exp per core, one thread; torch.exp on 16M floats):", "",
              "| shape | fwd (G updates/s) | fwd+bwd (G updates/s) |", "|---|---|---|"]
    for r in report["results"]:
        if r["peer"] == "kernel" and r.get("chunk") is None:
            n = r["b"] * r["d"] * r["L"] * r["N"]
            lines.append(f"| {r['shape']} | {n / r['fwd']['median_s'] / 1e9:.2f} | "
                         f"{n / r['fwdbwd']['median_s'] / 1e9:.2f} |")
    e = report.get("exp", {})
    if e:
        threads = m.get("torch_threads")
        lines += ["", f"exp throughput: kernel vector exp {e['kernel_vexp_per_core'] / 1e9:.2f} G/s per core; "
                  f"torch.exp {e['torch_exp_1_threads'] / 1e9:.2f} G/s on 1 thread, "
                  f"{e.get(f'torch_exp_{threads}_threads', 0) / 1e9:.2f} G/s on {threads} threads."]
    sweep = [r for r in report["results"] if r.get("chunk") is not None]
    if sweep:
        lines += ["", "Checkpoint interval K of the fused kernel (fwd+bwd median ms / peak MiB):", "",
                  "| shape | " + " | ".join(f"K={k}" for k in CHUNKS) + " |", "|---|" + "---|" * len(CHUNKS)]
        for name in dict.fromkeys(r["shape"] for r in sweep):
            cells = []
            for k in CHUNKS:
                r = next((r for r in sweep if r["shape"] == name and r["chunk"] == k), None)
                cells.append("—" if r is None or "fwdbwd" not in r else
                             f"{r['fwdbwd']['median_s'] * 1e3:.1f} / {r['fwdbwd']['peak_bytes'] / MIB:,.0f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (checks the script)")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(s[0] for s in SHAPES))
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per case at most (default 15)")
    ap.add_argument("--budget-s", type=float, default=20.0, help="time budget per case and mode (default 20 s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="timing rounds through all peers of a shape (median of round medians; default 1)")
    ap.add_argument("--chunk-sweep", action="store_true", help="also time the kernel for K in %s" % CHUNKS)
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:                                   # subprocess: one case, JSON on stdout
        spec = json.loads(args.worker[0])
        if spec.get("exp"):
            print(json.dumps(exp_throughput()))
        else:
            print(json.dumps(run_case(tuple(spec["shape"]), spec["peer"], spec["modes"], spec["repeats"],
                                      spec["budget_s"], spec.get("chunk"), spec.get("memory", False))))
        return 0

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [s for s in SHAPES + QUICK_SHAPES if s[0] in wanted]
    peers = args.peers.split(",")
    report = dict(machine=machine(), load_before=[round(x, 2) for x in os.getloadavg()], shapes=shapes,
                  results=[], args={k: str(v) for k, v in vars(args).items()})
    avail = mem_available()
    for shape in shapes:
        specs = {}
        for peer in peers:
            modes, skipped = [], {}
            for mode in ("fwd", "fwdbwd"):
                why = skip_reason(peer, shape, mode, avail)
                if why:
                    skipped[mode] = why
                else:
                    modes.append(mode)
            specs[peer] = (dict(shape=shape, peer=peer, modes=modes, repeats=args.repeats, budget_s=args.budget_s),
                           skipped)
        # Timing rounds go through all peers of the shape in turn, so a change in the machine's load hits
        # every peer alike; each peer's time is the median over rounds of its per-round median.
        rounds = {peer: [] for peer in peers}
        for _ in range(args.rounds):
            for peer in peers:
                spec, _ = specs[peer]
                if spec["modes"]:
                    rounds[peer].append(dict(run_worker([json.dumps(spec)], timeout=3600),
                                             load=round(os.getloadavg()[0], 2)))
        for peer in peers:
            spec, skipped = specs[peer]
            res = dict(shape=shape[0], peer=peer)
            if spec["modes"]:
                res = combine_rounds(rounds[peer], spec["modes"])
                mem = run_worker([json.dumps(dict(spec, memory=True))], timeout=3600, memory=True)
                for mode in spec["modes"]:
                    if mode in res and mode in mem:
                        res[mode]["peak_bytes"] = mem[mode]["peak_bytes"]
                if "error" in mem:
                    res["error"] = "memory run: " + mem["error"]
            res.update(shape=shape[0], peer=peer, b=shape[1], d=shape[2], L=shape[3], N=shape[4])
            res.setdefault("chunk", None)
            if skipped:
                res["skipped"] = skipped
            report["results"].append(res)
            print(f"{shape[0]:>16} {PEER_NAMES[peer]:<28} fwd {fmt_ms(res.get('fwd')):>9}  fwd+bwd "
                  f"{fmt_ms(res.get('fwdbwd')):>9}" + (f"  skipped {list(skipped)}" if skipped else "")
                  + (f"  ERROR {res['error']}" if "error" in res else ""), flush=True)
        if args.chunk_sweep and "kernel" in peers:
            for k in CHUNKS:
                spec = dict(shape=shape, peer="kernel", modes=["fwdbwd"], repeats=args.repeats,
                            budget_s=args.budget_s, chunk=k)
                res = run_worker([json.dumps(spec)], timeout=3600)
                mem = run_worker([json.dumps(dict(spec, memory=True))], timeout=3600, memory=True)
                if "fwdbwd" in res and "fwdbwd" in mem:
                    res["fwdbwd"]["peak_bytes"] = mem["fwdbwd"]["peak_bytes"]
                report["results"].append(res)
    report["exp"] = run_worker([json.dumps(dict(exp=True))], timeout=600)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "scan_cpu_quick" if args.quick else "scan_cpu"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / f"{stem}.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
