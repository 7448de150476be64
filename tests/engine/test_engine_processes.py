"""Runs in fresh processes: a 2-process torchrun DDP run equals the 1-process run on the same global batches,
and a run killed with SIGKILL mid-epoch, then resumed, ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambakit.engine.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
TOY = HERE / "engine_toy.py"


def run_toy(run_dir: Path, *overrides: str, nproc: int | None = None, resume: bool = False,
            extra_env: dict[str, str] | None = None, expect_killed: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    command = [*launcher, str(TOY), str(run_dir), "run.curves=false", "run.progress=false", *overrides]
    if resume:
        command.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if expect_killed:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_state(run_dir: Path) -> dict:
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return load_checkpoint(run_dir / "checkpoints" / pointer["file"])


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith(("val/", "test/")) for k in r)]


def test_two_process_ddp_equals_one_process(tmp_path):
    # 45 samples, global batch 8 kept whole: the last batch (5) splits 3 + 2 over the ranks; accumulation
    # windows of 2 micro-batches; odd validation/test sizes give uneven evaluation shards.
    common = ["train.epochs=2", "train.batch_size=8", "train.drop_last=false", "data.n_train=45", "data.n_val=21",
              "data.n_test=13", "train.grad_accum=2", "train.optimizer.weight_decay=0.1", "train.clip_grad_norm=0.5",
              "train.ema_decay=0.8", "train.scheduler.name=cosine", "train.scheduler.warmup_epochs=0.5"]
    # rank 0's clock moves 25 s per micro-batch, the other rank's stands still: time-triggered checkpoints
    # (60 s) fall at steps 2 and 5 on rank 0's word alone, and every rank takes part in them (no hang)
    common += ["train.checkpoint_every_minutes=1", "train.keep_checkpoints=10"]
    clock = {"MAMBAKIT_TEST_SECONDS_PER_CALL": "25"}
    run_toy(tmp_path / "single", *common, extra_env=clock)
    ddp_proc = run_toy(tmp_path / "ddp", *common, nproc=2, extra_env=clock)
    for run in ("single", "ddp"):
        assert sorted(p.name for p in (tmp_path / run / "checkpoints").glob("step-*.pt")) == \
            [f"step-0000000{s}.pt" for s in (2, 3, 5, 6)]
    single, ddp = last_state(tmp_path / "single"), last_state(tmp_path / "ddp")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2 and single["progress"] == ddp["progress"]
    assert_same(single["model"], ddp["model"], atol=1e-6)
    assert_same(single["ema"], ddp["ema"], atol=1e-6)
    single_rows, ddp_rows = eval_rows(tmp_path / "single"), eval_rows(tmp_path / "ddp")
    assert [r["step"] for r in single_rows] == [r["step"] for r in ddp_rows]
    for a, b in zip(single_rows, ddp_rows):
        for key in a:
            if key.endswith(("/loss", "/n", "/order_ok")):
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert [r["val/n"] for r in ddp_rows if "val/n" in r] == [21.0, 21.0]      # no padding duplicates
    assert all(r.get("val/order_ok", 1.0) == 1.0 and r.get("test/order_ok", 1.0) == 1.0 for r in ddp_rows)
    assert ddp_proc.stderr.count("run folder:") == 1 and ddp_proc.stderr.count("epoch 2 step") == 1  # rank 0 logs


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    # 48 samples, micro-batch 4, accumulation 2: 12 micro-batches = 6 steps per epoch. Checkpoints every 4
    # steps; the process kills itself at micro-batch 19 (epoch 2, micro-batch 7), after the step-8 checkpoint
    # (epoch 2, micro-batch 4). Dropout and data augmentation both draw random numbers.
    common = ["train.epochs=3", "train.batch_size=4", "train.grad_accum=2", "train.checkpoint_every_steps=4",
              "model.dropout=0.3", "data.augment=0.2", "train.ema_decay=0.9", "train.log_every_steps=1",
              "train.scheduler.name=step"]
    run_toy(tmp_path / "straight", *common)
    run_toy(tmp_path / "killed", *common, extra_env={"MAMBAKIT_TEST_KILL_AT_CALL": "19"}, expect_killed=True)
    interrupted = last_state(tmp_path / "killed")
    assert interrupted["progress"] == {"epoch": 1, "step": 8, "batch_in_epoch": 4, "stopped_early": False}
    run_toy(tmp_path / "killed", *common, resume=True)
    straight, resumed = last_state(tmp_path / "straight"), last_state(tmp_path / "killed")
    assert resumed["progress"] == straight["progress"] and resumed["progress"]["step"] == 18
    assert_same(straight["model"], resumed["model"], atol=1e-7)
    assert_same(straight["ema"], resumed["ema"], atol=1e-7)
    for a, b in zip(straight["optimizers"][0]["state"].values(), resumed["optimizers"][0]["state"].values()):
        assert_same(a, b, atol=1e-7)
    # the logs of the resumed run hold each step once, with the uninterrupted run's values
    straight_rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed_rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    key = lambda r: (r["step"], tuple(sorted(k for k in r if "/" in k)))
    assert [key(r) for r in resumed_rows] == [key(r) for r in straight_rows]
    for a, b in zip(straight_rows, resumed_rows):
        for name in a:
            if name.endswith("loss"):
                assert a[name] == pytest.approx(b[name], rel=1e-6), (a["step"], name)
