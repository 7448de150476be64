"""Vim's headline claim on a CPU: time and peak memory of Vim-Ti against timm's DeiT-Ti as the resolution grows,
and EfficientVMamba-T against ResNet-18 and MobileNetV2, from the same run.

    .venv/bin/python benchmarks/vision.py                          # everything, CPU, 2 threads
    .venv/bin/python benchmarks/vision.py --pairs vim --resolutions 224,512 --batches 1
    .venv/bin/python benchmarks/vision.py --profile vim:1024:1:forward   # where Vim's time goes

Modes: "forward" (inference: eval mode, no_grad) and "train" (forward + backward of a cross-entropy loss,
training mode, drop path 0). Resolutions 224, 512, 768, 1024 at batch 1 and 8; the models are built for
each resolution (img_size for the models with position embeddings: Vim, DeiT), randomly initialised,
1000 classes.

Every point runs in a fresh process, so that its peak memory is its own: the peak resident set size during
one step minus the size just before it (Linux VmHWM after resetting it through /proc/self/clear_refs). The
process's data segment is capped (`--mem-cap-gib`, default 12; RLIMIT_DATA), so a point that would need more
fails with an allocation error instead of pushing a shared machine into swap; such points are reported as
"over the cap". Time: the median over repeats after one warm-up step (at least 2 repeats, more while they
fit in `--min-seconds`; a single timed step where the warm-up takes over `--slow-seconds`). After the grid,
`--breakdowns` points are profiled (self CPU time per op, grouped: selective scan, attention, matmul, layout
copies, convolution, other), which says where the time goes. Writes benchmarks/results/vision.{json,md}.

`--scan-free` (forward only) replaces the Mamba models' fused CPU selective scan by a no-op that returns an
uninitialised output: the Mamba times are then those of everything else in the model, and the speed-ups the
most that any faster scan kernel could give against the same peers.

`--rounds R` runs the whole grid R times, the Mamba model first in odd rounds and its peers first in even
ones, and reports each time as the median over rounds and each speed-up as the median of the per-round
speed-ups with their range: on a machine whose speed drifts by tens of percent within minutes, a ratio of
two points measured back to back is steadier than a ratio of two medians.

On a machine shared with other jobs, run with OMP_WAIT_POLICY=PASSIVE: with more runnable threads than cores,
OpenMP's default spin-waiting makes every small op of a 2-thread process wait for a descheduled partner,
which slows Vim (hundreds of small ops per forward) far more than DeiT; the policy is recorded in the output.
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
from datetime import datetime
from pathlib import Path

import rounds  # benchmarks/rounds.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAIRS = {  # pair -> (the Mamba model, its peers)
    "vim": ("vim_tiny_patch16_224", ("deit_tiny_patch16_224",)),
    "effvm": ("efficient_vmamba_tiny", ("resnet18", "mobilenetv2_100")),
}
TITLES = {"vim_tiny_patch16_224": "Vim-Ti", "deit_tiny_patch16_224": "DeiT-Ti",
          "efficient_vmamba_tiny": "EfficientVMamba-T", "resnet18": "ResNet-18", "mobilenetv2_100": "MobileNetV2"}
RESOLUTIONS = (224, 512, 768, 1024)
BATCHES = (1, 8)
MODES = ("forward", "train")
MAMBA_MODELS = {mamba for mamba, _ in PAIRS.values()}


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


def build(name: str, resolution: int):
    import timm

    import mambakit.apps.vision  # noqa: F401  (registers vim_* / efficient_vmamba_*)

    kwargs = {"img_size": resolution} if name.startswith(("vim", "deit")) else {}
    if name.startswith(("vim", "deit", "efficient")):
        kwargs["drop_path_rate"] = 0.0
    return timm.create_model(name, num_classes=1000, **kwargs)


def _without_scan() -> None:
    """--scan-free: the fused CPU scan (plain and with delta projected in the kernel) becomes a no-op."""
    import torch

    from mambakit.kernels import cpu_scan

    def no_scan(u, *args, accumulate_into=None, return_last_state=False, **kwargs):
        out = accumulate_into if accumulate_into is not None else torch.empty_like(u)
        return (out, None) if return_last_state else out

    cpu_scan.selective_scan_cpu = cpu_scan.selective_scan_cpu_projected = no_scan


def measure(name: str, resolution: int, batch: int, mode: str, args) -> dict:
    """One point, in this process: times (s) and peak memory (MiB)."""
    import torch

    if args.scan_free and name in MAMBA_MODELS:
        _without_scan()
    torch.manual_seed(0)
    model = build(name, resolution)
    x = torch.randn(batch, 3, resolution, resolution)
    target = torch.randint(0, 1000, (batch,))
    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()

    resettable = _reset_peak_rss()
    base = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    step()                                   # the warm-up step; it also allocates the gradients in "train"
    warm = time.perf_counter() - t0
    peak = _vm_kib("VmHWM")
    peak_mib = (peak - base) / 1024 if (resettable and base is not None and peak is not None) else None
    times = []
    min_repeats = 1 if warm > args.slow_seconds else args.min_repeats     # one timed step for very slow points
    while len(times) < min_repeats or (sum(times) + warm < args.min_seconds and len(times) < args.max_repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"model": name, "resolution": resolution, "batch": batch, "mode": mode,
            "time_s": statistics.median(times), "times_s": [round(t, 5) for t in times], "warmup_s": round(warm, 4),
            "peak_mib": peak_mib, "params": sum(p.numel() for p in model.parameters()),
            "tokens": (resolution // 16) ** 2 + 1 if name.startswith(("vim", "deit")) else None}


def run_point(name: str, resolution: int, batch: int, mode: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_point", f"{name}:{resolution}:{batch}:{mode}",
           "--threads", str(args.threads), "--min-repeats", str(args.min_repeats), "--max-repeats",
           str(args.max_repeats), "--min-seconds", str(args.min_seconds), "--mem-cap-gib", str(args.mem_cap_gib),
           "--slow-seconds", str(args.slow_seconds)] + (["--scan-free"] if args.scan_free else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "resolution": resolution, "batch": batch, "mode": mode,
                "error": f"took more than {args.timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        over = any(s in proc.stderr for s in ("DefaultCPUAllocator: can't allocate memory", "MemoryError",
                                              "not enough memory", "Cannot allocate memory"))
        return {"model": name, "resolution": resolution, "batch": batch, "mode": mode,
                "error": f"over the {args.mem_cap_gib:g} GiB cap" if over else tail[-200:],
                "over_cap": over, "wall_s": round(time.time() - started, 1)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(args) -> dict:
    info = {"python": platform.python_version(), "cpus_visible": os.cpu_count(), "threads": args.threads,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)")}
    import torch
    import timm

    info.update(torch=torch.__version__, timm=timm.__version__)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    from mambakit.kernels.cpu_scan import kernel_status
    info["cpu_scan_kernel"] = bool(kernel_status()[0])
    from mambakit.runtime import configure_malloc, huge_pages_note, malloc_note
    configure_malloc()                       # what every point's process does, so that the note says it
    info["huge_pages"] = huge_pages_note()
    info["malloc"] = malloc_note()
    return info


# ---------------------------------------------------------------------------------------------------------
# reporting

def _fmt_time(p: dict) -> str:
    if "time_s" not in p:
        return p.get("error", "-") if p else "-"
    t = p["time_s"]
    return f"{t * 1000:.0f} ms" if t < 10 else f"{t:.1f} s"


def _fmt_mem(p: dict) -> str:
    return f"{p['peak_mib']:.0f}" if p.get("peak_mib") is not None else "-"


def _key(p: dict) -> tuple:
    return p["model"], p["resolution"], p["batch"], p["mode"]


def merge_rounds(points: list[dict]) -> dict:
    """(model, resolution, batch, mode) -> one point: the median time over the rounds, the largest peak."""
    return rounds.merge_rounds(points, _key, "time_s", "peak_mib")


def speedup(points: list[dict], mamba: str, peer: str, r: int, batch: int, mode: str):
    """Peer time / Mamba time within each round: (median, min, max) over the rounds, or None."""
    return rounds.paired_ratio(points, _key, "time_s", (peer, r, batch, mode), (mamba, r, batch, mode))


def crossovers(points: list[dict], pairs, resolutions, modes=MODES) -> list[dict]:
    """Per pair, peer, mode and batch: the smallest resolution from which the Mamba model is faster at every
    measured larger resolution (None when it never is), by the median per-round speed-up."""
    by = merge_rounds(points)
    out = []
    for pair in pairs:
        mamba, peers = PAIRS[pair]
        for peer in peers:
            for mode in modes:
                for batch in sorted({p["batch"] for p in points}):
                    faster = []
                    for r in resolutions:
                        m, q = by.get((mamba, r, batch, mode), {}), by.get((peer, r, batch, mode), {})
                        sp = speedup(points, mamba, peer, r, batch, mode)
                        if sp is not None:
                            faster.append((r, sp[0]))
                        elif "time_s" in m and q.get("over_cap"):
                            faster.append((r, float("inf")))       # the peer does not even fit
                    cross = None
                    for i, (r, _) in enumerate(faster):
                        if all(s > 1 for _, s in faster[i:]):
                            cross = r
                            break
                    out.append({"mamba": mamba, "peer": peer, "mode": mode, "batch": batch, "overtakes_at": cross,
                                "speedups": {r: (None if s == float("inf") else round(s, 3)) for r, s in faster}})
    return out


def markdown(points: list[dict], meta: dict) -> str:
    a, m = meta["args"], meta["machine"]
    lines = [
        "# Vision on the CPU: Vim-Ti vs DeiT-Ti, EfficientVMamba-T vs ResNet-18 / MobileNetV2",
        "",
        f"Generated by `benchmarks/vision.py` on {meta['generated']} ({m.get('cpu', '?')}, {a['threads']} threads, "
        f"torch {m.get('torch')}, timm {m.get('timm')}, fused CPU scan kernel: {m.get('cpu_scan_kernel')}, "
        f"OMP_WAIT_POLICY {m.get('omp_wait_policy')}, {m.get('huge_pages', 'huge pages not recorded')}, "
        f"{m.get('malloc', 'malloc setting not recorded')}; load "
        f"average {m.get('loadavg_start')} at the start, {m.get('loadavg_end')} at the end). Randomly initialised "
        f"models, 1000 classes. forward: eval mode, no_grad. train: forward + backward of cross-entropy. Time: "
        f"median over >= {a['min_repeats']} steps after a warm-up step. Peak MiB: extra resident memory of one "
        f"step (VmHWM - VmRSS before it), each point in its own process capped at {a['mem_cap_gib']:g} GiB. "
        f"Speed-up = peer time / Mamba time; memory ratio = Mamba peak / peer peak."
        + (f" {a.get('rounds', 1)} rounds, alternating which model runs first: times are medians over the "
           f"rounds, speed-ups the median of the per-round speed-ups (range in brackets)."
           if a.get("rounds", 1) > 1 else "")
        + (" **--scan-free: the Mamba models ran with their selective scan replaced by a no-op; their times are a "
           "lower bound, the speed-ups the most a faster scan could give.**" if a.get("scan_free") else ""),
        "",
    ]
    by = merge_rounds(points)
    for pair in a["pairs"]:
        mamba, peers = PAIRS[pair]
        for peer in peers:
            lines += [f"## {TITLES[mamba]} vs {TITLES[peer]}", "",
                      f"| mode | batch | pixels | {TITLES[mamba]} | {TITLES[peer]} | speed-up | "
                      f"{TITLES[mamba]} peak MiB | {TITLES[peer]} peak MiB | memory ratio |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for mode in MODES:
                for batch in a["batches"]:
                    for r in a["resolutions"]:
                        x, y = by.get((mamba, r, batch, mode)), by.get((peer, r, batch, mode))
                        if x is None and y is None:
                            continue
                        x, y = x or {}, y or {}
                        sp = rounds.format_ratio(speedup(points, mamba, peer, r, batch, mode))
                        mr = f"{x['peak_mib'] / y['peak_mib']:.2f}" if x.get("peak_mib") and y.get("peak_mib") else "-"
                        lines.append(f"| {mode} | {batch} | {r} | {_fmt_time(x)} | {_fmt_time(y)} | {sp} | "
                                     f"{_fmt_mem(x)} | {_fmt_mem(y)} | {mr} |")
            lines.append("")
    lines += ["## Where the Mamba model overtakes its peer", "",
              "| Mamba | peer | mode | batch | faster from (pixels) | speed-ups by resolution |", "|---|---|---|---|---|---|"]
    for c in meta["crossovers"]:
        sp = ", ".join(f"{r}: {'peer over cap' if s is None else f'{s:.2f}x'}" for r, s in c["speedups"].items())
        at = c["overtakes_at"] if c["overtakes_at"] is not None else "not in the range"
        lines.append(f"| {TITLES[c['mamba']]} | {TITLES[c['peer']]} | {c['mode']} | {c['batch']} | {at} | {sp} |")
    lines.append("")
    lines += breakdown_markdown(meta.get("breakdowns", []))
    return "\n".join(lines)


CATEGORIES = (  # profiler op name -> where the time goes
    ("selective scan", ("SelectiveScan",)),
    ("attention", ("scaled_dot_product", "_softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("layout copies", ("aten::copy_", "aten::index_select", "aten::index_add_", "aten::cat", "aten::gather",
                       "aten::scatter", "aten::clone", "aten::contiguous")),
    ("convolution", ("convolution", "CausalConv1d")),
)


def _category(op: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in op for k in keys):
            return name
    return "other (elementwise, norms, ...)"


def profile(spec: str, args, rows: int = 25) -> dict:
    """Where a model's time goes: `model_key:resolution:batch:mode` (model_key vim | effvm | a timm name).
    Returns self CPU time per profiler op and per category (seconds) of one step after a warm-up step."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    key, resolution, batch, mode = spec.split(":")
    name = PAIRS[key][0] if key in PAIRS else key
    torch.set_num_threads(args.threads)
    model = build(name, int(resolution))
    x = torch.randn(int(batch), 3, int(resolution), int(resolution))
    model.train(mode == "train")

    def step():
        if mode == "train":
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), torch.zeros(int(batch), dtype=torch.long)).backward()
        else:
            with torch.no_grad():
                model(x)
    step()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - t0
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()), key=lambda r: -r[1])
    by_category: dict[str, float] = {}
    for op, t, _ in ops:
        by_category[_category(op)] = by_category.get(_category(op), 0.0) + t
    return {"spec": spec, "model": name, "wall_s": round(wall, 4),
            "categories_s": {k: round(v, 4) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": op, "self_s": round(t, 4), "calls": n} for op, t, n in ops[:rows]]}


def run_breakdown(spec: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_breakdown", spec, "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"spec": spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][-200:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def breakdown_markdown(breakdowns: list[dict]) -> list[str]:
    if not breakdowns:
        return []
    cats = [c for c, _ in CATEGORIES] + ["other (elementwise, norms, ...)"]
    lines = ["## Where the time goes (profiler, self CPU time of one step)", "",
             "| model:pixels:batch:mode | wall | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
    for b in breakdowns:
        if "error" in b:
            lines.append(f"| {b['spec']} | {b['error']} |" + " |" * len(cats))
            continue
        total = sum(b["categories_s"].values()) or 1.0
        cells = [f"{b['categories_s'].get(c, 0.0):.2f} s ({100 * b['categories_s'].get(c, 0.0) / total:.0f}%)"
                 for c in cats]
        lines.append(f"| {b['spec'].replace('vim', 'Vim-Ti').replace('deit_tiny_patch16_224', 'DeiT-Ti')} | "
                     f"{b['wall_s']:.2f} s | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def main(argv=None) -> int:
    from mambakit.runtime import prefer_huge_pages

    prefer_huge_pages()                      # as the `mambakit` command; the model processes inherit it
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated: {', '.join(PAIRS)}")
    p.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="repeat the grid, alternating which model goes first")
    p.add_argument("--min-repeats", type=int, default=2)
    p.add_argument("--max-repeats", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=5.0, help="repeat while the total stays under this")
    p.add_argument("--slow-seconds", type=float, default=30.0,
                   help="a point whose warm-up step takes longer is timed over one step")
    p.add_argument("--mem-cap-gib", type=float, default=12.0, help="data-segment cap per point (RLIMIT_DATA)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    p.add_argument("--results", default=str(RESULTS / "vision"), help="output prefix (.json, .md)")
    p.add_argument("--profile", default=None, metavar="MODEL:RES:BATCH:MODE",
                   help="profile one point instead (MODEL: vim, effvm or a timm name)")
    p.add_argument("--breakdowns", default="vim:1024:1:forward,deit_tiny_patch16_224:1024:1:forward,vim:1024:1:train",
                   help="points profiled after the grid (comma-separated MODEL:RES:BATCH:MODE; empty: none)")
    p.add_argument("--scan-free", action="store_true",
                   help="forward only: time the Mamba models with their selective scan as a no-op (a bound)")
    p.add_argument("--_point", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_breakdown", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.profile:
        result = profile(args.profile, args)
        print(json.dumps(result, indent=1))
        return 0
    if args._breakdown or args._point:
        from mambakit.runtime import configure_malloc
        configure_malloc()                   # as the `mambakit` command does (MAMBAKIT_MALLOC=default: glibc's own)
    if args._breakdown:
        print(json.dumps(profile(args._breakdown, args)))
        return 0
    if args._point:
        cap = int(args.mem_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        import torch

        torch.set_num_threads(args.threads)
        name, res, batch, mode = args._point.split(":")
        print(json.dumps(measure(name, int(res), int(batch), mode, args)))
        return 0

    pairs = [s for s in args.pairs.split(",") if s]
    unknown = [s for s in pairs if s not in PAIRS]
    if unknown:
        p.error(f"--pairs: unknown {unknown}; expected some of {', '.join(PAIRS)}")
    resolutions = [int(v) for v in args.resolutions.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if args.scan_free and modes != ["forward"]:
        p.error("--scan-free times inference only: use it with --modes forward")
    meta = {"generated": datetime.now().isoformat(timespec="seconds"), "machine": machine(args),
            "args": {**{k: v for k, v in vars(args).items() if not k.startswith("_")}, "pairs": pairs,
                     "resolutions": resolutions, "batches": batches, "modes": modes}}
    points = []
    for rnd in range(args.rounds):
        for pair in pairs:
            mamba, peers = PAIRS[pair]
            order = rounds.alternate([mamba, *peers], rnd)
            for mode in modes:
                for batch in batches:
                    for r in resolutions:
                        for name in order:
                            point = {**run_point(name, r, batch, mode, args), "round": rnd}
                            points.append(point)
                            shown = (f"{_fmt_time(point)}, peak {_fmt_mem(point)} MiB" if "time_s" in point
                                     else point["error"])
                            print(f"{TITLES.get(name, name):>18} {mode:>7} b{batch} {r:>4}px"
                                  f"{f' round {rnd + 1}' if args.rounds > 1 else ''}: {shown}", flush=True)
    meta["breakdowns"] = [run_breakdown(spec, args) for spec in args.breakdowns.split(",") if spec]
    meta["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["crossovers"] = crossovers(points, pairs, resolutions, modes)
    prefix = Path(args.results)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "points": points}, indent=1) + "\n")
    prefix.with_suffix(".md").write_text(markdown(points, meta))
    print(markdown(points, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
