"""Training under a competing load (issue 20, "Shared machines"): a few training steps of each demo's model,
on a quiet machine and next to K other 2-thread torch processes (K = 0, 1, 2, 4), with torch's settings as
shipped, with the `mambakit` command's short OpenMP spin alone, and with everything it applies now (the
short spin and the thread count chosen from the machine's state), alternated in the same minutes. Writes benchmarks/results/load.{json,md} and prints the table.

    .venv/bin/python benchmarks/load.py                     # about 6-8 minutes on 2 quiet cores
    .venv/bin/python benchmarks/load.py --loads 0,2 --seconds 2 --workloads timeseries

Workloads (each a training step as the demo's quick recipe takes it: forward, loss, backward, optimizer step):
- timeseries: S-Mamba of quick_elecdemand.yaml (d_model 64, d_ff 128, 2 layers, d_state 2), batch 64,
  96 -> 48 steps, 3 variates + 4 calendar features, Adam;
- pathology: MambaMIL of quick_cohort_mambamil.yaml (SR-Mamba, rate 5, 2 layers) on one bag of 28 instances
  of 1024-d features (the embedded cohort's 665 patches / 24 slides), Adam;
- vision: Vim of quick_vim_mnist.yaml (patch 7, dim 96, depth 4) on a batch of 32 28x28 digits, AdamW;
Larger ones, that `--workloads` can add (not in the default run):
- extract: (not a training step) CLAM's resnet50_trunc, random weights, forward of a batch of 32 patches at
  112 px under no_grad, as the pathology demo's feature extraction;
- vim_ti: Vim-Ti (vim_tiny_patch16_224 at 112 px: 49 patches + class token), batch 16, AdamW;
- mil_10k: the pathology model on a bag of 10,000 instances.

Method
- Every (load, workload, setting) point is its own process, started with the settings' environment; after
  2 warm-up steps it runs steps for --seconds (at least one) and reports the wall time per step and its own
  CPU time per step (user + sys, getrusage). Spinning shows as CPU time that does no work.
- Competing load: K processes, each `torch.set_num_threads(2)` and a 256x256 float32 matmul in a loop (a
  CPU-bound 2-thread job with torch's stock OpenMP settings, as another user's training), started before
  the points of that K and killed after them. K + 1 two-thread jobs on the machine's cores: a fair share
  of 2 cores makes a step about K + 1 times slower (the "fair" column).
- Settings: "old" = torch's OpenMP as shipped (OMP_WAIT_POLICY and GOMP_SPINCOUNT unset: idle OpenMP
  threads spin 300,000 rounds before they sleep), every core; "spin" = mambakit's short spin
  (`mambakit.runtime.configure_openmp`), every core; "new" = what `mambakit` applies now before torch is
  imported: the short spin and MAMBAKIT_THREADS=auto (`configure_threads`: every core on a quiet machine,
  one thread where other processes already keep the cores busy, measured as the point starts). All apply the command's malloc and huge-page settings (`configure_malloc`,
  `prefer_huge_pages`). Other settings for experiments: "env:NAME=VALUE[,NAME=VALUE]" (on top of "old"),
  e.g. env:OMP_WAIT_POLICY=PASSIVE.
- The machine's load average is recorded at the start and the end of every point: a machine that others
  use too makes every number slower; compare old with new only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORKLOADS = ("timeseries", "pathology", "vision")
EXTRA_WORKLOADS = ("extract", "vim_ti", "mil_10k")
OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MAMBAKIT_THREADS")
SETTINGS = ("old", "spin", "new")
COMPETITOR_THREADS = 2
COMPETITOR_SIZE = 256
WARMUP_STEPS = 2


# --------------------------------------------------------------------------------------------------
# settings: the environment a point starts with

def settings_env(setting: str, base: dict | None = None) -> dict:
    """The environment of a point (or of a competitor: "old") from `base` (default os.environ): the OpenMP
    variables removed, then those of an "env:..." setting added. "new" adds nothing here: its child applies
    mambakit's own startup settings before it imports torch (see `_apply_setting`)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in OPENMP_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if setting in SETTINGS:
        return env
    if not setting.startswith("env:") or "=" not in setting:
        raise ValueError(f"setting {setting!r}: expected one of {SETTINGS} or 'env:NAME=VALUE[,NAME=VALUE]'")
    for pair in setting[4:].split(","):
        name, _, value = pair.partition("=")
        if not name.strip() or not value.strip():
            raise ValueError(f"setting {setting!r}: {pair!r} is not NAME=VALUE")
        env[name.strip()] = value.strip()
    return env


def _apply_setting(setting: str) -> dict:
    """In a point's process, before torch is imported: what the `mambakit` command does at startup (its
    malloc and huge-page settings for every setting; "spin" and "new" its OpenMP spin count too; "new" also
    its thread count, chosen from the machine as the point starts, next to the competing load)."""
    from mambakit import runtime

    runtime.prefer_huge_pages()
    runtime.configure_malloc()
    if setting in ("spin", "new"):
        runtime.configure_openmp()
    threads = runtime.configure_threads() if setting == "new" else {}
    note = runtime.openmp_note() + ("; threads: MAMBAKIT_THREADS=auto (all cores on a quiet machine, one where "
                                    "other processes keep the cores busy)" if setting == "new" else "")
    return {"openmp": note, "malloc": runtime.malloc_note(), "huge_pages": runtime.huge_pages_note(),
            "busy_cores": threads.get("busy")}


# --------------------------------------------------------------------------------------------------
# workloads

def build(name: str):
    """(step function, description) of a workload; every step is the same work."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if name == "timeseries":
        from mambakit.apps.timeseries.models import SMamba

        model = SMamba(96, 48, d_model=64, d_ff=128, e_layers=2, d_state=2)
        x, marks, y = torch.randn(64, 96, 3), torch.randn(64, 96, 4), torch.randn(64, 48, 3)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        loss = lambda: F.mse_loss(model(x, marks), y)                      # noqa: E731
    elif name == "pathology":
        from mambakit.apps.pathology.models import MambaMIL

        model = MambaMIL(1024, 2, dropout=0.0, layer=2, rate=5, mixer="SRMamba")
        bag, label = torch.randn(28, 1024), torch.tensor([1])
        opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5)
        loss = lambda: F.cross_entropy(model(bag), label)                  # noqa: E731
    elif name == "vision":
        import timm

        import mambakit.apps.vision.vim  # noqa: F401  (registers the Vim models with timm)

        model = timm.create_model("vim_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, embed_dim=96,
                                  depth=4, drop_path_rate=0.0, num_classes=10)
        images, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
        loss = lambda: F.cross_entropy(model(images), labels)              # noqa: E731
    elif name == "vim_ti":
        import timm

        import mambakit.apps.vision.vim  # noqa: F401

        model = timm.create_model("vim_tiny_patch16_224", img_size=112, drop_path_rate=0.0, num_classes=100)
        images, labels = torch.randn(16, 3, 112, 112), torch.randint(0, 100, (16,))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        loss = lambda: F.cross_entropy(model(images), labels)              # noqa: E731
    elif name == "mil_10k":
        from mambakit.apps.pathology.models import MambaMIL

        model = MambaMIL(1024, 2, dropout=0.0, layer=2, rate=5, mixer="SRMamba")
        bag, label = torch.randn(10000, 1024), torch.tensor([1])
        opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5)
        loss = lambda: F.cross_entropy(model(bag), label)                  # noqa: E731
    elif name == "extract":
        from mambakit.apps.pathology.features import resnet50_trunc

        model = resnet50_trunc().eval()
        patches = torch.randn(32, 3, 112, 112)

        def step():
            with torch.no_grad():
                model(patches)
        return step
    else:
        raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS + EXTRA_WORKLOADS}")
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    return step


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_point(name: str, setting: str, seconds: float) -> dict:
    """In this process (started by `point`): warm-up, then steps for `seconds`, timed."""
    notes = _apply_setting(setting)
    import torch

    step = build(name)
    for _ in range(WARMUP_STEPS):
        step()
    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), _cpu_s(), time.perf_counter()
    steps = 0
    while steps == 0 or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    wall, cpu, r1 = time.perf_counter() - t0, _cpu_s() - c0, resource.getrusage(resource.RUSAGE_SELF)
    return {"steps": steps, "step_ms": 1000 * wall / steps, "cpu_ms": 1000 * cpu / steps,
            "sys_ms": 1000 * (r1.ru_stime - r0.ru_stime) / steps,
            "minflt_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "ctx_switches_per_step": (r1.ru_nvcsw - r0.ru_nvcsw + r1.ru_nivcsw - r0.ru_nivcsw) / steps,
            "threads": torch.get_num_threads(), **notes}


def point(name: str, setting: str, load: int, rnd: int, args) -> dict:
    """One point in a fresh process with the setting's environment."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_point", name, setting, str(args.seconds)]
    info = {"workload": name, "setting": setting, "load": load, "round": rnd,
            "loadavg_before": os.getloadavg()[0]}
    try:
        proc = subprocess.run(cmd, env=settings_env(setting), capture_output=True, text=True,
                              timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**info, "error": f"no result within {args.timeout} s"}
    info["loadavg_after"] = os.getloadavg()[0]
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {**info, "error": tail}
    return {**info, **json.loads(proc.stdout.strip().splitlines()[-1])}


# --------------------------------------------------------------------------------------------------
# the competing load

COMPETITOR = f"""
import sys, time, torch
torch.set_num_threads({COMPETITOR_THREADS})
a = torch.randn({COMPETITOR_SIZE}, {COMPETITOR_SIZE})
a @ a
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(20):
        a @ a
"""


class Competitors:
    """K stock-torch 2-thread matmul loops, each bounded in time (`limit_s`) and killed on exit."""

    def __init__(self, k: int, limit_s: float):
        self.procs = [subprocess.Popen([sys.executable, "-c", COMPETITOR, str(limit_s)], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True, env=settings_env("old"))
                      for _ in range(k)]

    def __enter__(self):
        for p in self.procs:                        # each says "ready" after its first matmul
            if p.stdout.readline().strip() != "ready":
                self.stop()
                raise RuntimeError("a competing-load process did not start (torch import failed?)")
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()
            p.stdout.close()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------------------------------
# the run, the machine, the table

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
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    parallel = torch.__config__.parallel_info()
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": affinity, "torch": torch.__version__,
            "torch_parallel": next((ln.strip() for ln in parallel.splitlines() if "parallel backend" in ln), "?"),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "commit": commit,
            "loadavg_start": os.getloadavg()}


def summarize(points: list[dict]) -> dict:
    """(workload, setting, load) -> median step_ms and cpu_ms over the rounds (failed points kept apart)."""
    groups: dict = {}
    for p in points:
        groups.setdefault((p["workload"], p["setting"], p["load"]), []).append(p)
    out = {}
    for key, ps in groups.items():
        ok = [p for p in ps if "step_ms" in p]
        out[key] = ({"step_ms": statistics.median(p["step_ms"] for p in ok),
                     "cpu_ms": statistics.median(p["cpu_ms"] for p in ok), "rounds": len(ok),
                     "threads": sorted({p.get("threads") for p in ok}, key=str)}
                    if ok else {"error": ps[0].get("error", "failed")})
    return out


def _cell(s: dict | None, quiet: dict | None) -> str:
    if s is None:
        return "-"
    if "error" in s:
        return f"failed ({s['error'][:40]})"
    text = f"{s['step_ms']:.0f} ms"
    if quiet and "step_ms" in quiet and quiet is not s:
        text += f" ({s['step_ms'] / quiet['step_ms']:.1f}x)"
    return text + f", cpu {s['cpu_ms']:.0f}, " + "/".join(str(t) for t in s.get("threads", [])) + "t"


def markdown(points: list[dict], meta: dict) -> str:
    summary = summarize(points)
    loads = sorted({p["load"] for p in points})
    workloads = list(dict.fromkeys(p["workload"] for p in points))
    settings = list(dict.fromkeys(p["setting"] for p in points))
    m = meta["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), torch {m['torch']} "
             f"({m['torch_parallel']}, {m['torch_threads']} threads), Python {m['python']}, commit {m['commit']}; "
             f"load average {m['loadavg_start'][0]:.2f} at the start, {meta['loadavg_end'][0]:.2f} at the end.",
             f"Settings: " + "; ".join(f"{s}: {meta['notes'].get(s, '?')}" for s in settings) + ".",
             f"{meta['seconds']} s of steps per point after {WARMUP_STEPS} warm-up steps, {meta['rounds']} "
             f"round(s), settings alternated. Cells: wall time per step (slowdown against K = 0 with the same "
             f"setting), CPU time per step (user + sys) in ms, torch threads. Fair share of the cores: K + 1 times slower.", "",
             "| workload | setting | " + " | ".join(f"K = {k}" for k in loads) + " |",
             "|---|---|" + "---|" * len(loads)]
    for w in workloads:
        for s in settings:
            quiet = summary.get((w, s, 0))
            lines.append(f"| {w} | {s} | " + " | ".join(_cell(summary.get((w, s, k)), quiet) for k in loads) + " |")
    for base in [b for b in ("old", "spin") if b in settings and "new" in settings]:
        lines += ["", f"{base} / new, wall time per step:", "",
                  "| workload | " + " | ".join(f"K = {k} (fair {k + 1}x)" for k in loads) + " |",
                  "|---|" + "---|" * len(loads)]
        for w in workloads:
            cells = []
            for k in loads:
                a, b = summary.get((w, base, k)), summary.get((w, "new", k))
                cells.append(f"{a['step_ms'] / b['step_ms']:.2f}" if a and b and "step_ms" in a and "step_ms" in b
                             else "-")
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="0,1,2,4", help="numbers of competing 2-thread processes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"of {WORKLOADS + EXTRA_WORKLOADS}")
    parser.add_argument("--settings", default="old,spin,new", help="old, spin, new, env:NAME=VALUE[,NAME=VALUE]")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed steps per point (after warm-up)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0, help="per point")
    parser.add_argument("--out", default="load", help="results/<out>.{json,md}")
    parser.add_argument("--_point", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._point:
        name, setting, seconds = args._point
        print(json.dumps(run_point(name, setting, float(seconds))))
        return 0
    loads = [int(k) for k in args.loads.split(",")]
    workloads = args.workloads.split(",")
    settings = args.settings.split(",")
    for s in settings:
        try:
            settings_env(s)                              # refuse a bad setting before any work
        except ValueError as err:
            parser.error(str(err))
    for w in workloads:
        if w not in WORKLOADS + EXTRA_WORKLOADS:
            parser.error(f"unknown workload {w!r}; expected some of {WORKLOADS + EXTRA_WORKLOADS}")
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the competing processes are killed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    meta = {"machine": machine(), "seconds": args.seconds, "rounds": args.rounds, "notes": {}}
    points: list[dict] = []
    turn = 0
    for k in loads:
        with Competitors(k, limit_s=args.timeout * len(workloads) * len(settings) * args.rounds + 60):
            for rnd in range(args.rounds):
                for w in workloads:
                    order = settings if turn % 2 == 0 else list(reversed(settings))
                    turn += 1
                    for s in order:
                        p = point(w, s, k, rnd, args)
                        meta["notes"].setdefault(s, p.get("openmp"))
                        points.append(p)
                        shown = (f"{p['step_ms']:.1f} ms/step, cpu {p['cpu_ms']:.1f} ms/step, {p['steps']} steps"
                                 if "step_ms" in p else p["error"])
                        print(f"K={k} {w:10s} {s:8s} {shown} (load avg {p['loadavg_before']:.1f})", flush=True)
    meta["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = markdown(points, meta)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "points": points}, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
