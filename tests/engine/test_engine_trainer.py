"""The fit loop in one process: accumulation, early stopping with the best weights, precision, EMA, logs and
run-folder files, max_steps, resume rules, errors, fine-tuning and manual optimisation."""

from __future__ import annotations

import csv
import json
import math
import sys
import types

import pytest
import torch
from engine_toy import ToyRecipe, ToyTask

from mambakit.engine.checkpoint import CheckpointError, load_checkpoint
from mambakit.engine.config import load_config
from mambakit.engine.schema import EarlyStoppingConfig
from mambakit.engine.task import PretrainedReport, load_matching
from mambakit.engine.trainer import BestTracker, Trainer, evaluate, read_pretrained_weights


def recipe(*overrides: str) -> ToyRecipe:
    return load_config(ToyRecipe, None, ["run.curves=false", "run.progress=false", "train.batch_size=8",
                                         *overrides])


def fit(run_dir, *overrides, task_cls=ToyTask, resume=False, **trainer_kw):
    task = task_cls(recipe(*overrides))
    return Trainer(task, **trainer_kw).fit(run_dir, resume=resume), task


def final_model(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.last_checkpoint)["model"]


def assert_same_params(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


# --------------------------------------------------------------------------------------------------

def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    small, _ = fit(tmp_path / "a", "train.epochs=2", "train.batch_size=8", "train.grad_accum=3",
                   "train.clip_grad_norm=0.3", "train.optimizer.weight_decay=0.05")
    large, _ = fit(tmp_path / "b", "train.epochs=2", "train.batch_size=24", "train.grad_accum=1",
                   "train.clip_grad_norm=0.3", "train.optimizer.weight_decay=0.05")
    assert small.steps == large.steps == 4
    assert_same_params(final_model(small), final_model(large))
    # and it really trained: the weights moved away from their initialisation (the engine seeds train.seed=0
    # before build_model)
    torch.manual_seed(0)
    initial = ToyTask(recipe()).build_model().state_dict()
    assert (final_model(small)["inp.weight"] - initial["inp.weight"]).abs().max() > 1e-3


class ScriptedVal(ToyTask):
    """Validation loss follows a script, so the early-stopping decisions are known in advance."""
    script = [5.0, 4.0, 4.5, 4.0, 4.2, 4.3, 1.0, 1.0]

    def __init__(self, config):
        super().__init__(config)
        self.val_calls = 0

    def compute_metrics(self, outputs, split):
        metrics = super().compute_metrics(outputs, split)
        if split == "val" and "script" not in metrics:
            metrics["loss"] = self.script[self.val_calls // (2 if self.config.train.ema_decay else 1)]
            self.val_calls += 1
        return metrics


def test_early_stopping_stops_at_the_right_epoch_and_keeps_the_best(tmp_path):
    result, task = fit(tmp_path / "run", "train.epochs=10", "train.early_stopping.patience=2",
                       "train.keep_checkpoints=1", task_cls=ScriptedVal)
    # evals: 5 (best), 4 (best), 4.5 (bad 1), 4.0 (tie = improvement, as TSLib), 4.2 (bad 1), 4.3 (bad 2) -> stop
    assert (result.epochs, result.stopped_early, result.best_epoch, result.best_value) == (6, True, 4, 4.0)
    assert result.best_checkpoint.name == "step-00000024.pt" and result.steps == 36
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == \
        ["step-00000024.pt", "step-00000036.pt"]                       # the last one plus the best
    assert result.metrics["val/loss"] == 4.0                           # the restored weights' validation
    best_test = evaluate(ToyTask(recipe()), result.best_checkpoint, split="test")
    assert result.metrics["test/loss"] == pytest.approx(best_test["test/loss"], rel=1e-6)
    last_test = evaluate(ToyTask(recipe()), result.last_checkpoint, split="test")
    assert last_test["test/loss"] != pytest.approx(best_test["test/loss"], rel=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["weights"] == "best" and summary["weights_step"] == 24 and summary["stopped_early"]


def test_best_tracker_rules():
    tracker = BestTracker(EarlyStoppingConfig(monitor="val/acc", mode="max", patience=2, min_delta=0.1,
                                              min_epochs=4))
    decisions = [tracker.update({"val/acc": v}, epoch, epoch) for epoch, v in
                 enumerate([0.5, 0.55, 0.5, 0.62, float("nan"), 0.6], start=1)]
    # 0.55 is not better by 0.1; 0.62 is; nan is never an improvement; min_epochs 4 holds stopping off
    assert decisions == [(True, False), (False, False), (False, False), (True, False), (False, False),
                         (False, True)]
    assert tracker.best == 0.62 and tracker.best_epoch == 4
    with pytest.raises(ValueError, match=r"monitor='val/acc' is not among the validation metrics: val/loss"):
        BestTracker(EarlyStoppingConfig(monitor="val/acc", patience=1)).update({"val/loss": 1.0}, 1, 1)
    assert BestTracker(EarlyStoppingConfig(monitor="val/acc")).update({"val/loss": 1.0}, 1, 1) == (False, False)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    class DtypeToy(ToyTask):
        dtypes: list = []
        eval_dtypes: list = []

        def training_step(self, model, batch):
            x, y, _ = batch
            pred = model(x)
            self.dtypes.append(pred.dtype)
            return torch.nn.functional.mse_loss(pred.float(), y)

        def eval_step(self, model, batch):
            out = super().eval_step(model, batch)
            self.eval_dtypes.append(torch.is_autocast_enabled("cpu"))
            out["se"] = out["se"].to(torch.bfloat16)
            return out

        def compute_metrics(self, outputs, split):
            self.eval_dtypes.append(outputs["se"].dtype)
            return super().compute_metrics(outputs, split)

    result, task = fit(tmp_path / "run", "train.epochs=1", "train.precision=bf16", task_cls=DtypeToy)
    assert task.dtypes and set(task.dtypes) == {torch.bfloat16}
    # eval_step runs under autocast too; its bf16 outputs are widened (losslessly) before the metrics
    assert task.eval_dtypes[0] is True and torch.float32 in task.eval_dtypes and torch.bfloat16 not in task.eval_dtypes
    assert all(v.dtype == torch.float32 for v in final_model(result).values())
    assert math.isfinite(result.metrics["val/loss"]) and math.isfinite(result.metrics["test/loss"])


def test_fp16_on_cpu_and_missing_cuda_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="train.precision=fp16 needs CUDA"):
        fit(tmp_path / "a", "train.precision=fp16", "train.device=cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device=cuda, but CUDA is not available"):
            fit(tmp_path / "b", "train.device=cuda")


def test_batch_size_must_divide_over_the_world(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="train.batch_size=8 is the global batch per micro-step and must be "
                                         "divisible by the world size 3"):
        fit(tmp_path / "a")


def test_run_folder_files_are_written_and_parseable(tmp_path, capsys):
    run = tmp_path / "run"
    result, task = fit(run, "train.epochs=2", "train.log_every_steps=2", "train.ema_decay=0.5",
                       "run.curves=true", "run.progress=true")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == len(result.history)
    assert [float(r["step"]) for r in table] == [float(r["step"]) for r in rows]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10, 12]
    assert all(r["lr"] == 1e-3 and r["train/samples_per_s"] > 0 and "train/mae" in r for r in train_rows)
    val_rows = [r for r in rows if "val/loss" in r]
    assert [(r["step"], r["epoch"]) for r in val_rows] == [(6, 1), (12, 2)]
    assert all("val_ema/loss" in r and r["val/order_ok"] == 1.0 for r in val_rows)
    assert "test/loss" in rows[-1] and "test_ema/loss" in rows[-1]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(ToyRecipe, run / "config.yaml") == task.config
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"] == result.metrics and summary["steps"] == 12
    assert any("tensorboard is not installed" in n for n in summary["notes"]) or "tensorboard" in sys.modules
    assert not (run / "tensorboard").exists() or "tensorboard" in sys.modules
    assert (run / "fit_end.txt").exists() and task.fit_end_calls == 1
    err = capsys.readouterr().err
    assert f"run folder: {run}" in err and "train: 100%" in err and "samples/s" in err


def test_tensorboard_gets_every_scalar_when_installed(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, key, value, step):
            calls.append((key, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close", None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    fit(tmp_path / "run", "train.epochs=1", "train.log_every_steps=3")
    assert calls[0] == ("open", str(tmp_path / "run" / "tensorboard")) and calls[-1] == ("close", None)
    assert ("train/loss", 3) in calls and ("val/loss", 6) in calls and ("test/loss", 6) in calls and ("lr", 6) in calls


def test_max_steps_stops_mid_epoch_and_evaluates(tmp_path):
    result, _ = fit(tmp_path / "run", "train.epochs=5", "train.max_steps=4")
    state = load_checkpoint(result.last_checkpoint)
    assert (result.steps, result.epochs) == (4, 0)
    assert state["progress"] == {"epoch": 0, "step": 4, "batch_in_epoch": 4, "stopped_early": False}
    assert [r["step"] for r in result.history if "val/loss" in r] == [4]
    # resuming a finished run trains no further and reports the same
    again, _ = fit(tmp_path / "run", "train.epochs=5", "train.max_steps=4", resume=True)
    assert again.steps == 4 and again.metrics == pytest.approx(result.metrics)


def test_resume_rules(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cannot resume: no checkpoint in"):
        fit(tmp_path / "empty", resume=True)
    with pytest.raises(CheckpointError, match="cannot resume: run folder .*missing does not exist"):
        fit(tmp_path / "missing", resume=True)
    with pytest.raises(ValueError, match="--resume needs the run folder"):
        fit(None, resume=True)
    fit(tmp_path / "done", "train.epochs=1")
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        fit(tmp_path / "done", "train.epochs=1")


def test_checkpoint_of_another_model_lists_the_mismatch(tmp_path):
    result, _ = fit(tmp_path / "run", "train.epochs=1")
    with pytest.raises(CheckpointError, match=r"does not match the model .*6 shape mismatches: .*inp.weight: "
                                              r"checkpoint \(16, 5\) vs model \(8, 5\)"):
        evaluate(ToyTask(recipe("model.hidden=8")), result.last_checkpoint)


def test_resumed_config_changes_are_reported(tmp_path):
    fit(tmp_path / "run", "train.epochs=1")
    fit(tmp_path / "run", "train.epochs=2", resume=True)
    notes = json.loads((tmp_path / "run" / "summary.json").read_text())["notes"]
    assert any("train.epochs: 1 -> 2" in n for n in notes) and any("resumed from" in n for n in notes)


def test_pretrained_weights_load_by_key_and_shape(tmp_path):
    source, _ = fit(tmp_path / "src", "train.epochs=1")

    class Recording(ToyTask):
        reports: list = []

        def load_pretrained(self, model, state_dict):
            report = super().load_pretrained(model, state_dict)
            self.reports.append((report, {k: v.clone() for k, v in model.state_dict().items()}))
            return report

    fit(tmp_path / "ft", "train.epochs=1", "data.features=3", task_cls=Recording, pretrained=tmp_path / "src")
    report, loaded = Recording.reports[-1]
    assert report.skipped_shape == ["inp.weight: weights (16, 5) vs model (16, 3)"] and not report.missing
    best = load_checkpoint(source.best_checkpoint)["model"]
    assert torch.equal(loaded["out.weight"], best["out.weight"]) and torch.equal(loaded["norm.bias"], best["norm.bias"])
    notes = json.loads((tmp_path / "ft" / "summary.json").read_text())["notes"]
    assert any("dropped from the weights, shape mismatch: 1: inp.weight: weights (16, 5) vs model (16, 3)" in n
               and "left fresh (as initialised): 1: inp.weight" in n for n in notes)


def test_read_pretrained_weights_formats(tmp_path):
    weights = {"a.weight": torch.randn(2, 2), "a.bias": torch.randn(2)}
    for name, payload in [("bare", weights), ("model", {"model": weights, "epoch": 3}),
                          ("lightning", {"state_dict": weights})]:
        torch.save(payload, tmp_path / f"{name}.pt")
        state, _ = read_pretrained_weights(tmp_path / f"{name}.pt")
        assert state.keys() == weights.keys()
    torch.save({"model": weights, "args": types.SimpleNamespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"could not read pretrained weights .*pickled.pt with "
                                         r"torch.load\(weights_only=True\)"):
        read_pretrained_weights(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="'no-such-weights'"):
        read_pretrained_weights("no-such-weights")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    report = load_matching(model, {"module.0.weight": torch.ones(2, 2), "module.0.bias": torch.ones(3)})
    assert isinstance(report, PretrainedReport) and report.loaded == ["0.weight"]
    assert report.skipped_shape == ["0.bias: weights (3,) vs model (2,)"] and report.missing == []
    assert torch.equal(model[0].weight, torch.ones(2, 2))
    with pytest.raises(ValueError, match="none of the 1 pretrained tensors matches the model"):
        load_matching(model, {"other": torch.ones(1)})


class ManualToy(ToyTask):
    """Two optimisers driven by hand (the shape of a GAN step)."""
    manual_optimization = True

    def configure_optimizers(self, model):
        first = [*model.inp.parameters(), *model.norm.parameters(), model.scale]
        return [torch.optim.SGD(first, lr=0.1), torch.optim.Adam(model.out.parameters(), lr=0.01)]

    def manual_step(self, model, batch, optimizers, step):
        x, y, _ = batch
        for optimizer in optimizers:
            step.zero_grad(optimizer)
            loss = torch.nn.functional.mse_loss(model(x), y)
            step.backward(loss)
            step.step(optimizer)
        return {"loss": float(loss.detach()), "second": 1.0}


def test_manual_optimization(tmp_path):
    torch.manual_seed(0)                                 # what the engine does before build_model
    before = ToyTask(recipe()).build_model().state_dict()
    result, _ = fit(tmp_path / "run", "train.epochs=1", "train.log_every_steps=3", "train.clip_grad_norm=1",
                    "train.scheduler.name=linear", task_cls=ManualToy)
    state = load_checkpoint(result.last_checkpoint)
    assert len(state["optimizers"]) == 2 and result.steps == 6
    assert not torch.equal(state["model"]["out.weight"], before["out.weight"])
    assert not torch.equal(state["model"]["inp.weight"], before["inp.weight"])
    rows = [r for r in result.history if "train/loss" in r]
    assert rows[0]["train/second"] == 1.0 and rows[0]["lr"] == pytest.approx(0.1 * (1 - 2 / 6))
    with pytest.raises(ValueError, match="manual_optimization supports one process and train.grad_accum=1"):
        fit(tmp_path / "acc", "train.grad_accum=2", task_cls=ManualToy)


def test_bad_hook_results_are_named(tmp_path):
    class VectorLoss(ToyTask):
        def training_step(self, model, batch):
            x, y, _ = batch
            return (model(x) - y) ** 2

    with pytest.raises(TypeError, match=r"VectorLoss.training_step must return a scalar loss tensor .* got \(8,\)"):
        fit(tmp_path / "a", task_cls=VectorLoss)

    class NoVal(ToyTask):
        def build_datasets(self):
            data = super().build_datasets()
            data.val = None
            return data

    with pytest.raises(ValueError, match="early_stopping.patience is set, but the task has no validation split"):
        fit(tmp_path / "b", "train.early_stopping.patience=2", task_cls=NoVal)
    class Diverging(ToyTask):
        def training_step(self, model, batch):
            return super().training_step(model, batch)[0] * float("nan")

    with pytest.raises(ValueError, match=r"training loss is nan at step 2 \(epoch 0\); lower train.optimizer.lr"):
        fit(tmp_path / "d", "train.log_every_steps=2", task_cls=Diverging)
    with pytest.raises(ValueError, match=r"_EmptyVal.build_datasets\(\): the val dataset is empty"):
        fit(tmp_path / "c", task_cls=_EmptyVal)


class _EmptyVal(ToyTask):
    def build_datasets(self):
        data = super().build_datasets()
        data.val.x, data.val.y = data.val.x[:0], data.val.y[:0]
        return data


def test_task_sample_order_drives_the_epochs(tmp_path):
    class Balanced(ToyTask):
        seen: list = []
        orders: dict = {}

        def train_order(self, epoch, generator):
            weights = torch.ones(48)
            weights[:8] = 20.0                              # oversample the first 8 samples
            order = torch.multinomial(weights, 40, replacement=True, generator=generator)
            self.orders.setdefault(epoch, order.tolist())
            return order

        def training_step(self, model, batch):
            self.seen.extend(batch[2].tolist())
            return super().training_step(model, batch)

    result, task = fit(tmp_path / "run", "train.epochs=2", task_cls=Balanced)
    assert result.steps == 10                                # 40 draws per epoch / batch 8
    assert task.seen == task.orders[0] + task.orders[1] and task.orders[0] != task.orders[1]
    assert sum(i < 8 for i in task.seen) > 40                # the weights took effect

    class Shrinking(Balanced):
        def train_order(self, epoch, generator):
            return list(range(40 - 8 * epoch))

    with pytest.raises(ValueError, match=r"train_order\(1\) returned 32 indices, epoch 0 had 40"):
        fit(tmp_path / "bad", "train.epochs=2", task_cls=Shrinking)


class _TwoTokenMamba(torch.nn.Module):
    """A regression net with one core Mamba mixer over the two tokens (x, flip(x))."""

    def __init__(self, features: int):
        super().__init__()
        from mambakit.core.mamba import Mamba

        self.mixer = Mamba(features, d_state=4, d_conv=2, expand=1)
        self.out = torch.nn.Linear(features, 1)

    def forward(self, x):
        h = self.mixer(torch.stack([x, x.flip(-1)], dim=1))
        return self.out(h[:, -1]).squeeze(-1)


class _MambaToy(ToyTask):
    def build_model(self):
        return _TwoTokenMamba(self.config.data.features)

    def training_step(self, model, batch):
        self.flags = getattr(self, "flags", set()) | {model.mixer.memory_efficient}
        return super().training_step(model, batch)


def test_memory_efficient_option_switches_the_mixers_and_trains_to_the_same_weights(tmp_path):
    lean, lean_task = fit(tmp_path / "lean", "train.epochs=2", "train.memory_efficient=true", task_cls=_MambaToy)
    plain, plain_task = fit(tmp_path / "plain", "train.epochs=2", task_cls=_MambaToy)
    assert lean_task.flags == {True} and plain_task.flags == {False}
    assert_same_params(final_model(lean), final_model(plain), atol=1e-5)
    with pytest.raises(ValueError, match=r"train.memory_efficient=true, but the model \(MLP\) has no Mamba-1"):
        fit(tmp_path / "mlp", "train.epochs=1", "train.memory_efficient=true")


def test_a_run_records_its_threads_and_a_resume_under_auto_keeps_them(tmp_path, monkeypatch):
    import json

    import mambakit.runtime as rt

    before = torch.get_num_threads()
    monkeypatch.setitem(rt._THREADS_STATE, "mode", "auto")
    try:
        torch.set_num_threads(1)
        result, _ = fit(tmp_path / "run", "train.epochs=1")
        assert load_checkpoint(result.last_checkpoint)["threads"] == 1
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["threads"] == 1
        torch.set_num_threads(2)            # the machine is quiet now: auto would take both cores
        fit(tmp_path / "run", "train.epochs=2", resume=True)
        assert torch.get_num_threads() == 1
        notes = json.loads((tmp_path / "run" / "summary.json").read_text())["notes"]
        assert any("resumed with the 1 thread(s) the run started with" in n for n in notes)
    finally:
        torch.set_num_threads(before)
