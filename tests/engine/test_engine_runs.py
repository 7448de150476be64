"""Runs as a user meets them (issue 20): checkpoints taken by time inside an epoch (with an injected clock, no
waiting), a run stopped mid-epoch and resumed in the same process ending with the weights of a run that never
stopped, failed starts leaving no run folder behind, the list of artefacts at the end, and what fine-tuning
loaded."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from engine_toy import ToyRecipe, ToyTask

from mambakit.engine.checkpoint import CheckpointError, checkpoint_name, load_checkpoint, save_checkpoint
from mambakit.engine.config import ConfigError, load_config
from mambakit.engine.runner import standard_verbs
from mambakit.engine.schema import TrainConfig
from mambakit.engine.task import load_matching
from mambakit.engine.trainer import Trainer


def recipe(*overrides: str) -> ToyRecipe:
    return load_config(ToyRecipe, None, ["run.curves=false", "run.progress=false", "run.tensorboard=false",
                                         "train.batch_size=8", *overrides])


def steps_saved(run_dir) -> list[int]:
    return sorted(int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


class Stopped(Exception):
    """Stands for a crash: raised from training_step at a chosen call."""


class Crashing(ToyTask):
    crash_at = 0

    def training_step(self, model, batch):
        if self.crash_at and self.calls + 1 == self.crash_at:
            raise Stopped(f"stopped at call {self.crash_at}")
        return super().training_step(model, batch)


def fit_with_clock(run_dir, *overrides, seconds_per_call: float, resume=False, crash_at=0, task_cls=Crashing):
    """Train with a clock that moves `seconds_per_call` per training_step call: the time-triggered
    checkpoints fall at steps known in advance, with no real waiting."""
    task = task_cls(recipe(*overrides))
    task.crash_at = crash_at
    trainer = Trainer(task, clock=lambda: seconds_per_call * task.calls)
    return trainer.fit(run_dir, resume=resume), task


# --------------------------------------------------------------------------------------------------
# checkpoints by time

def test_checkpoints_are_taken_by_time_inside_the_epoch(tmp_path):
    # 48 samples / batch 8 = 6 steps per epoch; 40 s per step; a checkpoint once 60 s passed since the last:
    # steps 2 (80 s), 4 (160 - 80), epoch end 6, then 8 (320 - 240), 10, epoch end 12.
    fit_with_clock(tmp_path / "timed", "train.epochs=2", "train.checkpoint_every_minutes=1",
                   "train.keep_checkpoints=10", seconds_per_call=40.0)
    assert steps_saved(tmp_path / "timed") == [2, 4, 6, 8, 10, 12]
    state = load_checkpoint(tmp_path / "timed" / "checkpoints" / checkpoint_name(4))
    assert state["progress"] == {"epoch": 0, "step": 4, "batch_in_epoch": 4, "stopped_early": False}
    # off: only the epoch ends
    fit_with_clock(tmp_path / "off", "train.epochs=2", "train.checkpoint_every_minutes=null",
                   "train.keep_checkpoints=10", seconds_per_call=40.0)
    assert steps_saved(tmp_path / "off") == [6, 12]


def test_time_checkpoints_are_on_by_default_every_five_minutes(tmp_path):
    assert TrainConfig().checkpoint_every_minutes == 5.0
    # 100 s per step: 300 s are reached at step 3 and again at step 9 (300 s after the epoch-end save at 6)
    fit_with_clock(tmp_path / "run", "train.epochs=2", "train.keep_checkpoints=10", seconds_per_call=100.0)
    assert steps_saved(tmp_path / "run") == [3, 6, 9, 12]
    # step and time triggers combine; either one restarts the time count
    fit_with_clock(tmp_path / "both", "train.epochs=1", "train.keep_checkpoints=10", "train.checkpoint_every_steps=4",
                   seconds_per_call=100.0)
    assert steps_saved(tmp_path / "both") == [3, 4, 6]


def test_checkpoint_every_minutes_is_validated():
    with pytest.raises(ConfigError, match="checkpoint_every_minutes must be > 0 or null, got 0.0"):
        recipe("train.checkpoint_every_minutes=0")
    with pytest.raises(ConfigError, match="checkpoint_every_minutes must be > 0 or null, got -1.0"):
        recipe("train.checkpoint_every_minutes=-1")


# --------------------------------------------------------------------------------------------------
# resume in the same process

RESUME = ["train.epochs=3", "train.batch_size=4", "train.grad_accum=2", "model.dropout=0.3", "data.augment=0.2",
          "train.ema_decay=0.9", "train.log_every_steps=1", "train.scheduler.name=cosine",
          "train.scheduler.warmup_epochs=0.5", "train.optimizer.weight_decay=0.05", "train.clip_grad_norm=0.5",
          "train.checkpoint_every_minutes=1", "train.keep_checkpoints=20"]


@pytest.mark.parametrize("workers", [0, 1])
def test_stop_mid_epoch_then_resume_in_process_equals_a_straight_run(tmp_path, workers):
    # 12 micro-batches of 4 = 6 steps of 2 per epoch; 10 s per micro-batch = 20 s per step, so the time
    # checkpoints fall at steps 3, 9 and 15 (and the epoch ends 6, 12, 18). The run stops at micro-batch 22
    # (inside step 11, epoch 2): it resumes from step 9, micro-batch 6 of epoch 2, with Adam's moments, the
    # schedule's position, the EMA and the random streams of dropout and augmentation as they were there.
    common = [*RESUME, f"train.num_workers={workers}"]
    straight, _ = fit_with_clock(tmp_path / "straight", *common, seconds_per_call=10.0)
    assert steps_saved(tmp_path / "straight") == [3, 6, 9, 12, 15, 18]
    with pytest.raises(Stopped):
        fit_with_clock(tmp_path / "stopped", *common, seconds_per_call=10.0, crash_at=22)
    assert steps_saved(tmp_path / "stopped") == [3, 6, 9]
    resumed, task = fit_with_clock(tmp_path / "stopped", *common, seconds_per_call=10.0, resume=True)
    assert task.calls == 36 - 18                      # only the 18 micro-batches after step 9 were trained
    a, b = load_checkpoint(straight.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    assert a["progress"] == b["progress"] == {"epoch": 3, "step": 18, "batch_in_epoch": 0, "stopped_early": False}
    for part in ("model", "ema"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-7, msg=f"{part} {key}")
    for (ka, sa), (kb, sb) in zip(a["optimizers"][0]["state"].items(), b["optimizers"][0]["state"].items()):
        for name in sa:
            torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=1e-7, msg=f"adam {ka} {name}")
    assert a["schedulers"] == b["schedulers"] == [{"step_count": 18}]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    losses = lambda result: [(r["step"], r["train/loss"]) for r in result.history if "train/loss" in r]
    assert [s for s, _ in losses(resumed)] == list(range(1, 19))
    for (step, x), (_, y) in zip(losses(straight), losses(resumed)):
        assert x == pytest.approx(y, rel=1e-6), step
    assert resumed.metrics["test/loss"] == pytest.approx(straight.metrics["test/loss"], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# failed starts leave no run folder

class NoImages(ToyTask):
    def build_datasets(self):
        raise FileNotFoundError("data/images: holds no image files (expected <class>/<image> folders)")


class CrashFirstStep(ToyTask):
    def training_step(self, model, batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def _corrupt_checkpoint(path):
    save_checkpoint({"format": "mambakit-checkpoint-v1", "model": {"w": torch.zeros(4)}}, path)
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize("case", ["unreachable weights", "refused checkpoint", "empty data folder",
                                  "model fails at the first step", "config the device cannot run",
                                  "no training samples"])
def test_a_failed_start_leaves_no_run_folder(tmp_path, case):
    out = tmp_path / "runs"
    overrides = [f"run.out_dir={out}", "train.epochs=1", "run.tensorboard=true"]
    kwargs, task_cls = {}, ToyTask
    if case == "unreachable weights":
        kwargs["pretrained"] = "no-such-weights.in1k"
        expected = FileNotFoundError
    elif case == "refused checkpoint":
        _corrupt_checkpoint(tmp_path / "pre.pt")
        kwargs["pretrained"] = tmp_path / "pre.pt"
        expected = CheckpointError
    elif case == "empty data folder":
        task_cls, expected = NoImages, FileNotFoundError
    elif case == "model fails at the first step":
        task_cls, expected = CrashFirstStep, RuntimeError
    elif case == "config the device cannot run":
        overrides += ["train.precision=fp16", "train.device=cpu"]
        expected = ValueError
    else:
        overrides += ["data.n_train=4"]                         # fewer than one batch of 8
        expected = ValueError
    with pytest.raises(expected):
        Trainer(task_cls(recipe(*overrides)), **kwargs).fit(name_hint="toy-quick")
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_a_failed_start_keeps_a_folder_that_existed_and_what_the_user_put_there(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("my notes\n")
    with pytest.raises(FileNotFoundError):
        Trainer(NoImages(recipe())).fit(run)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        Trainer(CrashFirstStep(recipe())).fit(run)
    assert (run / "notes.txt").read_text() == "my notes\n"
    # a folder this run created but the user wrote into meanwhile keeps the user's file
    fresh = tmp_path / "runs" / "fresh"

    class UserWrites(CrashFirstStep):
        def training_step(self, model, batch):
            (fresh / "user.txt").write_text("mine\n")
            return super().training_step(model, batch)

    with pytest.raises(RuntimeError):
        Trainer(UserWrites(recipe())).fit(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["user.txt"]


def test_a_refused_resume_checkpoint_keeps_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _corrupt_checkpoint(run / "checkpoints" / checkpoint_name(6))
    (run / "notes.txt").write_text("keep\n")
    with pytest.raises(CheckpointError, match="every checkpoint failed verification"):
        Trainer(ToyTask(recipe())).fit(run, resume=True)
    assert (run / "notes.txt").exists() and (run / "checkpoints" / "step-00000006.pt.refused").exists()


def test_a_run_that_failed_after_its_first_checkpoint_keeps_its_folder(tmp_path):
    run = tmp_path / "runs" / "crashed"
    with pytest.raises(Stopped):
        fit_with_clock(run, "train.epochs=2", seconds_per_call=0.0, crash_at=8)    # after the epoch-1 save
    assert steps_saved(run) == [6] and (run / "config.yaml").exists()


def test_a_bad_config_on_the_command_line_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe_file = tmp_path / "toy.yaml"
    recipe_file.write_text("train:\n  epochs: 1\n  batch_size: 8\nrun:\n  progress: false\n  curves: false\n")
    verb = {v.name: v for v in standard_verbs("toy", ToyRecipe, NoImages)}["train"]
    parser = argparse.ArgumentParser()
    verb.add_arguments(parser)
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        verb.run(parser.parse_args(["-c", str(recipe_file), "train.lrr=1"]))
    with pytest.raises(FileNotFoundError, match="holds no image files"):
        verb.run(parser.parse_args(["-c", str(recipe_file)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.yaml"]


# --------------------------------------------------------------------------------------------------
# the end of a run lists its artefacts

class Plots(ToyTask):
    def on_fit_end(self, model, run_dir):
        super().on_fit_end(model, run_dir)
        (run_dir / "heatmaps").mkdir()
        for i in range(14):
            (run_dir / "heatmaps" / f"slide{i:02d}.png").write_bytes(b"x" * (100 + i))


def test_the_end_of_a_run_lists_every_file_with_its_size(tmp_path, capsys):
    run = tmp_path / "run"
    result = Trainer(Plots(recipe("train.epochs=1", "run.curves=true"))).fit(run)
    on_disk = sorted((os.path.relpath(os.path.join(root, f), run).replace(os.sep, "/"),
                      os.path.getsize(os.path.join(root, f))) for root, _, files in os.walk(run) for f in files)
    assert result.artefacts == on_disk
    names = [name for name, _ in on_disk]
    assert {"curves.png", "summary.json", "config.yaml", "metrics.jsonl", "metrics.csv", "fit_end.txt",
            "checkpoints/step-00000006.pt", "heatmaps/slide13.png"} <= set(names)
    err = capsys.readouterr().err
    assert f"wrote {len(on_disk)} file(s), " in err and f"in {run}:" in err
    ckpt_size = dict(on_disk)["checkpoints/step-00000006.pt"]
    line = next(x for x in err.splitlines() if "checkpoints/step-00000006.pt" in x)
    assert line.split()[-2:] == [f"{ckpt_size / 1024:.1f}", "KiB"]
    # a folder of many files: its first 12 by name, then one line for the rest (slide12 and slide13)
    assert "heatmaps/slide11.png" in err and "heatmaps/slide12.png" not in err
    assert "heatmaps/: 2 more file(s), 225 B" in err


def test_eval_says_what_it_wrote(tmp_path, capsys):
    Trainer(ToyTask(recipe("train.epochs=1"))).fit(tmp_path / "run")
    verb = {v.name: v for v in standard_verbs("toy", ToyRecipe, ToyTask)}["eval"]
    parser = argparse.ArgumentParser()
    verb.add_arguments(parser)
    verb.run(parser.parse_args(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "m.json")]))
    size = (tmp_path / "m.json").stat().st_size
    assert f"wrote {tmp_path / 'm.json'} ({size} B)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# fine-tuning says what it loaded

def test_finetune_names_the_source_the_loaded_count_the_fresh_and_the_dropped_keys(tmp_path, capsys):
    source = Trainer(ToyTask(recipe("train.epochs=1"))).fit(tmp_path / "pre")
    weights = load_checkpoint(source.best_checkpoint)["model"]
    # a state dict of another model: an extra head the model lacks, no out.bias, and inp of another width
    other = {**{k: v for k, v in weights.items() if k != "out.bias"}, "old_head.weight": torch.ones(3, 16)}
    torch.save(other, tmp_path / "other.pt")
    trainer = Trainer(ToyTask(recipe("train.epochs=1", "data.features=3")), pretrained=tmp_path / "other.pt")
    trainer.fit(tmp_path / "ft")
    report = trainer.pretrained_report
    assert sorted(report.loaded) == ["inp.bias", "norm.bias", "norm.weight", "out.weight", "scale"]
    assert sorted(report.fresh) == ["inp.weight", "out.bias"]
    assert report.skipped_shape == ["inp.weight: weights (16, 5) vs model (16, 3)"]
    assert report.unexpected == ["old_head.weight"] and report.available == 7
    err = capsys.readouterr().err
    assert f"pretrained weights from {tmp_path / 'other.pt'}: loaded 5 tensors of the 7 tensors in the weights" in err
    assert "left fresh (as initialised): 2: inp.weight, out.bias" in err
    assert "dropped from the weights, shape mismatch: 1: inp.weight: weights (16, 5) vs model (16, 3)" in err
    assert "dropped from the weights, unused by the model: 1: old_head.weight" in err
    notes = json.loads((tmp_path / "ft" / "summary.json").read_text())["notes"]
    assert any("loaded 5 tensors of the 7" in n and "left fresh" in n for n in notes)
    # load_matching (the default load_pretrained): pretrained tensors where they fit, initialisation elsewhere
    torch.manual_seed(0)
    probe = ToyTask(recipe("data.features=3")).build_model()
    init = {k: v.clone() for k, v in probe.state_dict().items()}
    load_matching(probe, other)
    assert torch.equal(probe.state_dict()["out.weight"], weights["out.weight"])
    assert torch.equal(probe.state_dict()["out.bias"], init["out.bias"])
    assert torch.equal(probe.state_dict()["inp.weight"], init["inp.weight"])
