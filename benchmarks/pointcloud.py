"""Point clouds at scale on the CPU: forward+backward time and peak memory per batch for PCM-Tiny and PCM
against PointNet++ (SSG) and Point Transformer, at 1k, 4k, 16k and 64k points per cloud, ratios from one run.

    .venv/bin/python benchmarks/pointcloud.py                 # writes benchmarks/results/pointcloud.{json,md}
    .venv/bin/python benchmarks/pointcloud.py --quick         # 512 and 1024 points: checks the script
    .venv/bin/python benchmarks/pointcloud.py --models pcm_tiny,pcm_tiny_serial --sizes 1024,65536

Method
- Every (model, size) runs in its own subprocess (a clean peak, an out-of-memory kill contained); the parent
  stops a child above --limit-gib resident memory or after --timeout-s, reports it, and skips that model's
  larger sizes.
- One step = model(pos, xyz) -> cross-entropy on 40 classes -> backward into every parameter; float32,
  train mode, a batch of --batch clouds (default 2: the least the heads' BatchNorm trains with) of uniformly
  random points in the unit cube. The
  models are the published classification configurations (40 classes, xyz input) built by
  `mambakit.apps.pointcloud.models.create_model`; `pcm_tiny_serial` is PCM-Tiny with the large-cloud
  options (sampling and neighbours from the Hilbert serialization instead of FPS and exact kNN).
- Warm-up: one step at 512 points, then the median of 3 steps (1 above 4k points).
- Memory: the peak resident set size during the timed step above the level before it (VmHWM after
  /proc/self/clear_refs, minus VmRSS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import measure  # benchmarks/measure.py, next to this script
import rounds  # benchmarks/rounds.py

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MODELS = {"pcm_tiny": ("PCM-Tiny", "pcm_tiny", {}),
          "pcm": ("PCM", "pcm", {}),
          "pcm_tiny_serial": ("PCM-Tiny, serialized sampling + neighbours", "pcm_tiny",
                              {"sampler": "serial", "neighbours": "serial"}),
          "pointnet2_ssg": ("PointNet++ (SSG)", "pointnet2_ssg", {}),
          "point_transformer": ("Point Transformer", "point_transformer", {})}
SIZES = [1024, 4096, 16384, 65536]
QUICK_SIZES = [512, 1024]
PEER = "point_transformer"


def child(key: str, n_points: int, batch: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from mambakit.apps.pointcloud.models import create_model
    from mambakit.runtime import configure_malloc

    configure_malloc()
    torch.manual_seed(0)
    _, name, kwargs = MODELS[key]
    model = create_model(name, 40, in_channels=3, **kwargs).train()
    labels = torch.randint(0, 40, (batch,))

    def step(pos):
        loss = F.cross_entropy(model(pos, pos), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(torch.rand(batch, 512, 3))
    pos = torch.rand(batch, n_points, 3)
    rss_before = measure.status_kib("VmRSS")
    measure.reset_peak()
    start = time.perf_counter()
    step(pos)
    times = [time.perf_counter() - start]
    peak_kib = measure.status_kib("VmHWM") - rss_before
    for _ in range(repeats - 1):
        start = time.perf_counter()
        step(pos)
        times.append(time.perf_counter() - start)
    return {"model": key, "size": n_points, "batch": batch, "status": "ok", "time_s": statistics.median(times),
            "times_s": times, "peak_gib": peak_kib / 2**20, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}


def _key(r: dict) -> tuple:
    return r["model"], r["size"]


def table(results: list[dict], sizes: list[int]) -> str:
    """One row per (points, model); ratios: Point Transformer's time / memory over the row's (> 1: the row's
    model is faster / leaner), and the row's time over its own time at the previous size (growth)."""
    ok = [r for r in results if r["status"] == "ok"]
    merged = rounds.merge_rounds(ok, _key, "time_s", "peak_gib")
    by = {**{_key(r): r for r in results if r["status"] != "ok"}, **merged}
    models = list(dict.fromkeys(r["model"] for r in results))
    lines = ["| points | model | params | fwd+bwd s | peak GiB | Point Transformer time / this | "
             "Point Transformer memory / this | time growth vs previous size |",
             "|---|---|---|---|---|---|---|---|"]
    for i, n in enumerate(sizes):
        for key in models:
            r = by.get((key, n))
            if r is None:
                continue
            ratios = [rounds.format_ratio(rounds.paired_ratio(ok, _key, k, (PEER, n), (key, n)))
                      for k in ("time_s", "peak_gib")]
            prev = by.get((key, sizes[i - 1])) if i else None
            growth = (f"{r['time_s'] / prev['time_s']:.2f}x for {n // sizes[i - 1]}x points"
                      if prev and prev.get("status") == "ok" and r.get("status") == "ok" else "-")
            params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-"
            lines.append(f"| {n:,} | {MODELS[key][0]} | {params} | {measure.fmt(r, 'time_s')} | "
                         f"{measure.fmt(r, 'peak_gib', 3)} | {ratios[0]} | {ratios[1]} | {growth} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} (a check of the script)")
    parser.add_argument("--sizes", default=None, help="comma-separated points per cloud (default 1024,...,65536)")
    parser.add_argument("--models", default="pcm_tiny,pcm,pointnet2_ssg,point_transformer",
                        help=f"comma-separated from {','.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=2, help="clouds per batch (default 2)")
    parser.add_argument("--largest", default="", metavar="MODEL=N[,MODEL=N]",
                        help="skip a model above N points (its cost; reported as skipped)")
    parser.add_argument("--limit-gib", type=float, default=20.0, help="stop a case above this resident memory")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="stop a case after this long")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the grid, alternating the model order")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/pointcloud[_quick])")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch, args.repeats)))
        return 0
    sizes = QUICK_SIZES if args.quick else ([int(s) for s in args.sizes.split(",")] if args.sizes else SIZES)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    largest = {k: int(v) for k, v in (item.split("=") for item in args.largest.split(",") if item)}
    info = measure.machine(ROOT) | {"load_average_start": os.getloadavg()}
    results, failed_at = [], {}
    for rnd in range(args.rounds):
        for n in sizes:
            for key in rounds.alternate(models, rnd):
                if n > largest.get(key, n):
                    results.append({"model": key, "size": n, "status": "skipped", "round": rnd,
                                    "detail": f"above --largest {largest[key]:,} points"})
                    continue
                if key in failed_at:
                    results.append({"model": key, "size": n, "status": "skipped", "round": rnd,
                                    "detail": f"{failed_at[key]['status']} at {failed_at[key]['size']:,} points"})
                    continue
                cmd = [sys.executable, __file__, "--child", key, str(n), "--batch", str(args.batch),
                       "--repeats", str(3 if n <= 4096 else 1)]
                r = {**measure.run_child(cmd, ROOT, args.limit_gib, args.timeout_s), "model": key, "size": n,
                     "round": rnd}
                results.append(r)
                if r["status"] != "ok":
                    failed_at[key] = r
                shown = (f"{r['time_s']:.3f} s, {r['peak_gib']:.3f} GiB" if r["status"] == "ok"
                         else r.get("detail", r["status"]))
                print(f"{MODELS[key][0]:<45} {n:>7,} points: {shown}", flush=True)
    info["load_average_end"] = os.getloadavg()
    stem = Path(args.out) if args.out else RESULTS / ("pointcloud_quick" if args.quick else "pointcloud")
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = table(results, sizes)
    notes = [measure.machine_note(info),
             f"A batch of {args.batch} clouds, forward + backward, float32, train mode, 40 classes; peak = resident "
             f"memory above the level before the step. See benchmarks/pointcloud.py for the method."]
    notes += [f"- {MODELS[r['model']][0]} at {r['size']:,} points: {r['status']} ({r.get('detail', '')})"
              for r in results if r["status"] != "ok"]
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(md + "\n\n" + "\n".join(notes) + "\n")
    print("\n" + md + "\n\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
