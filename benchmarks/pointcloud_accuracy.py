"""Accuracy of the point-cloud models on the embedded CGAL sets, several seeds, one table: test overall
accuracy / mean class accuracy (classification) and instance / class mIoU (part segmentation), with the
parameter count and the training time per epoch (evaluation included) on this machine.

    .venv/bin/python benchmarks/pointcloud_accuracy.py                       # both tasks, 4 models, 3 seeds
    .venv/bin/python benchmarks/pointcloud_accuracy.py --tasks seg --models pcm_tiny_small,pointnet2_ssg --seeds 0

Every run is `mambakit pointcloud train -c cgal_<task> model.name=... train.seed=S` in its own process (the
recipes cgal_cls.yaml / cgal_seg.yaml hold the protocol: 512 points, 6 epochs, AdamW 1e-3, cosine; the best
validation epoch's weights are tested). `--seeds-for pcm=0` runs a model on fewer seeds (its cost).
Writes benchmarks/results/pointcloud_accuracy.{json,md}; runs go to a temporary folder (--keep to keep them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import measure  # benchmarks/measure.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMALL = ["model.name=pcm_tiny", "model.kwargs.embed_dim=64", "model.kwargs.mamba_blocks=[1,1,1,1]",
         "model.kwargs.orders=[xyz,zxy,hilbert,z]"]
MODELS = {"pcm_tiny_small": ("PCM-Tiny, small (the quickstart's)", SMALL),
          "pcm_tiny": ("PCM-Tiny", ["model.name=pcm_tiny"]),
          "pcm": ("PCM", ["model.name=pcm"]),
          "pointnet2_ssg": ("PointNet++ (SSG)", ["model.name=pointnet2_ssg"]),
          "point_transformer": ("Point Transformer", ["model.name=point_transformer"])}
METRICS = {"cls": ("oa", "macc"), "seg": ("instance_miou", "class_miou")}
PROTOCOL = ("Protocol: configs/pointcloud/cgal_{cls,seg}.yaml (512 points, 6 epochs, batch 16, AdamW 1e-3, cosine, "
            "best validation epoch tested); classification OA / mAcc, part segmentation instance / class mIoU; "
            "s / epoch (evaluation included) from the runs that had both cores.")


def run_one(task: str, key: str, seed: int, out: Path) -> dict:
    run_dir = out / f"{task}-{key}-s{seed}"
    cmd = [sys.executable, "-m", "mambakit", "pointcloud", "train", "-c", f"cgal_{task}", *MODELS[key][1],
           f"train.seed={seed}", "run.progress=false", "run.curves=false", "--run-dir", str(run_dir)]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        return {"task": task, "model": key, "seed": seed, "status": "error",
                "detail": " ".join(proc.stderr.strip().splitlines()[-2:])}
    summary = json.loads((run_dir / "summary.json").read_text())
    import torch

    state = torch.load(summary["best"]["checkpoint"], map_location="cpu", weights_only=True)["model"]
    m = summary["metrics"]
    return {"task": task, "model": key, "seed": seed, "status": "ok",
            **{k: m[f"test/{k}"] for k in METRICS[task]}, "params": sum(v.numel() for v in state.values()
                                                                         if v.is_floating_point()),
            "epochs": summary["epochs"], "wall_s": time.time() - started,
            "s_per_epoch": summary["wall_time_s"] / max(summary["epochs"], 1), "threads": summary.get("threads")}


def table(results: list[dict]) -> str:
    lines = ["| task | model | params | s / epoch | seeds | test metric 1 (mean ± std) | test metric 2 (mean ± std) |",
             "|---|---|---|---|---|---|---|"]
    for task in ("cls", "seg"):
        names = METRICS[task]
        for key in MODELS:
            rows = [r for r in results if r["task"] == task and r["model"] == key and r["status"] == "ok"]
            if not rows:
                continue

            def stat(k):
                vals = [r[k] for r in rows]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                return f"{names[0] if k == names[0] else names[1]} {statistics.mean(vals):.3f} ± {sd:.3f}"

            # the time of runs that had both cores (`mambakit` drops to one thread when the machine is busy)
            timed = [r["s_per_epoch"] for r in rows if r.get("threads") == 2] or [r["s_per_epoch"] for r in rows]
            lines.append(f"| {'classification' if task == 'cls' else 'part segmentation'} | {MODELS[key][0]} | "
                         f"{rows[0]['params'] / 1e6:.2f}M | {statistics.median(timed):.0f} | "
                         f"{', '.join(str(r['seed']) for r in rows)} | {stat(names[0])} | {stat(names[1])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="seg,cls")
    parser.add_argument("--models", default="pcm_tiny_small,pcm_tiny,pointnet2_ssg,point_transformer,pcm")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--seeds-for", default="pcm=0", help="MODEL=S[,S] pairs, ';'-separated: fewer seeds")
    parser.add_argument("--out", default=str(RESULTS / "pointcloud_accuracy"))
    parser.add_argument("--keep", default=None, help="keep the runs in this folder")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS.json",
                        help="no runs: write one table (to --out) from the results files of earlier runs")
    args = parser.parse_args(argv)
    if args.merge:
        loaded = [json.loads(Path(f).read_text()) for f in args.merge]
        results = [r for d in loaded for r in d["results"]]
        notes = [measure.machine_note(d["machine"]) for d in loaded if "load_average_end" in d["machine"]]
        md = table(results) + "\n\n" + "\n".join(notes + [PROTOCOL, f"Merged from {', '.join(args.merge)}."]) + "\n"
        Path(args.out).with_suffix(".md").write_text(md)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"merged": args.merge, "results": results}, indent=1) + "\n")
        print(md)
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    per_model = {}
    for item in filter(None, args.seeds_for.split(";")):
        name, values = item.split("=")
        per_model[name] = [int(s) for s in values.split(",")]
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pc-acc-"))
    info = measure.machine(ROOT) | {"load_average_start": os.getloadavg()}
    results = []
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for task in args.tasks.split(","):
        for key in args.models.split(","):
            for seed in per_model.get(key, seeds):
                r = run_one(task, key, seed, out)
                results.append(r)
                shown = {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}
                print(f"{task} {key} seed {seed}: {r['status']} {shown or r.get('detail', '')}", flush=True)
                stem.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    info["load_average_end"] = os.getloadavg()
    md = table(results)
    notes = [measure.machine_note(info), PROTOCOL]
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(md + "\n\n" + "\n".join(notes) + "\n")
    print("\n" + md + "\n\n" + "\n".join(notes))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
