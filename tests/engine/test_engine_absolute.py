"""Every engine option against a result computed by hand (issue 27), not against another run of the engine.

The model is linear in its parameters and the loss is the batch mean of its output, so the gradient of every
parameter is known without autograd: d loss / d u = mean of the batch's x (for W's rows, F and u alike) and
d loss / d b = 1. With SGD (no momentum) one update moves a parameter by exactly -lr * gradient, so the weights
before each training_step call tell which learning rate, clipping factor, accumulation and decay each update
used; the expected values below are written from the options' definitions (torch, timm and Hugging Face docs),
not taken from engine code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mambakit.engine.checkpoint import load_checkpoint
from mambakit.engine.config import load_config
from mambakit.engine.ema import ModelEMA
from mambakit.engine.schema import RunConfig, TrainConfig
from mambakit.engine.task import Datasets, Task
from mambakit.engine.trainer import Trainer

D = 3
# rows of x: small binary fractions, so means of 2, 4 or 8 rows are exact in float32
X = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [0.25, 0.5, 2.0], [-1.0, 4.0, 1.0],
                  [2.0, 2.0, 2.0], [0.5, -0.5, 0.75], [-3.0, 1.5, 0.25], [1.0, 0.0, -2.0],
                  [0.75, 1.25, -0.5], [2.5, -1.0, 1.0]])
INIT = {"W": torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]), "F": torch.tensor([[1.0, 2.0, -1.0]]),
        "u": torch.tensor([0.5, 0.5, -1.5]), "b": torch.tensor([0.75])}


@dataclass
class LinData:
    n: int = 8
    x_value: float | None = None       # every entry of x set to this (precision test)


@dataclass
class LinRecipe:
    data: LinData = field(default_factory=LinData)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(progress=False, curves=False, tensorboard=False))


class Rows(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], torch.tensor(i)


class Linear(nn.Module):
    """out = sum_j W_j . x + F . x + u . x + b: W (2, D) decayed; F (1, D) flagged _no_weight_decay; u (D,)
    and b (1,) excluded by the ndim <= 1 / bias rule."""

    def __init__(self):
        super().__init__()
        for name, value in INIT.items():
            setattr(self, name, nn.Parameter(value.clone()))
        self.F._no_weight_decay = True

    def forward(self, x):
        return (x @ self.W.t()).sum(-1) + (x @ self.F.t()).squeeze(-1) + x @ self.u + self.b


class LinTask(Task):
    app = "lin"

    def __init__(self, config):
        super().__init__(config)
        self.seen: list[list[int]] = []                       # sample indices of each training_step call
        self.before: list[dict[str, torch.Tensor]] = []       # the parameters when each call started

    def x(self):
        d = self.config.data
        return torch.full((d.n, D), d.x_value) if d.x_value is not None else X[:d.n].clone()

    def build_model(self):
        return Linear()

    def build_datasets(self):
        return Datasets(train=Rows(self.x()), val=Rows(self.x()))

    def training_step(self, model, batch):
        x, index = batch
        self.seen.append(index.tolist())
        self.before.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return model(x).mean()

    def eval_step(self, model, batch):
        x, index = batch
        return {"out": model(x)}

    def compute_metrics(self, outputs, split):
        return {"loss": float(outputs["out"].mean())}


def train(*overrides, task_cls=LinTask, tmp_path=None):
    config = load_config(LinRecipe, None, ["train.optimizer.name=sgd", "train.optimizer.momentum=0",
                                           "train.optimizer.lr=0.5", "train.epochs=1",
                                           "train.checkpoint_every_minutes=null", *overrides])
    task = task_cls(config)
    result = Trainer(task).fit(tmp_path / "run")
    final = load_checkpoint(result.last_checkpoint)
    return task, result, final


def grads(x_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of mean(out) over these rows, by hand."""
    m = x_rows.double().mean(0)
    return {"W": torch.stack([m, m]), "F": m[None], "u": m, "b": torch.ones(1, dtype=torch.float64)}


def step(params, grad, lr, factor=1.0):
    return {k: params[k].double() - lr * factor * grad[k] for k in params}


def assert_params(actual, expected, atol=1e-6):
    for key in expected:
        torch.testing.assert_close(actual[key].double(), expected[key].double(), rtol=0, atol=atol, msg=key)


def init64():
    return {k: v.double() for k, v in INIT.items()}


# --------------------------------------------------------------------------------------------------
# gradient clipping

@pytest.mark.parametrize("clip", [0.5, 1e3])
def test_clipping_scales_the_step_by_clip_over_the_norm(tmp_path, clip):
    task, result, final = train(f"train.clip_grad_norm={clip}", "train.batch_size=8", "train.log_every_steps=1",
                                tmp_path=tmp_path)
    g = grads(X[:8])
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))     # over W, F, u, b together
    assert norm == pytest.approx(math.sqrt(4 * float((X[:8].double().mean(0) ** 2).sum()) + 1))
    factor = min(1.0, clip / norm)
    assert (factor < 0.25) == (clip == 0.5)                              # 0.5 clips hard, 1e3 not at all
    assert_params(final["model"], step(init64(), g, 0.5, factor))
    logged = [r["train/grad_norm"] for r in result.history if "train/grad_norm" in r]
    assert logged == [pytest.approx(norm, rel=1e-6)]                     # the norm before clipping


def test_without_clipping_the_step_is_the_plain_gradient(tmp_path):
    task, result, final = train("train.batch_size=8", tmp_path=tmp_path)
    assert_params(final["model"], step(init64(), grads(X[:8]), 0.5))
    assert not any("train/grad_norm" in r for r in result.history)


# --------------------------------------------------------------------------------------------------
# gradient accumulation

def test_two_micro_batches_make_one_step_on_their_union(tmp_path):
    task, result, final = train("train.batch_size=4", "train.grad_accum=2", tmp_path=tmp_path)
    assert result.steps == 1 and len(task.seen) == 2 and sorted(task.seen[0] + task.seen[1]) == list(range(8))
    assert_params(task.before[1], INIT)                                  # no update between the micro-batches
    assert_params(final["model"], step(init64(), grads(X[:8]), 0.5))     # the mean over all 8 rows


def test_a_short_last_window_is_its_own_mean(tmp_path):
    # 10 rows, micro-batches of 4, 4 and 2 (drop_last off), windows of 2: step 1 = mean over the first 8
    # rows seen (two batches of 4), step 2 = the mean of the last 2 rows alone (not halved)
    task, result, final = train("data.n=10", "train.batch_size=4", "train.grad_accum=2", "train.drop_last=false",
                                tmp_path=tmp_path)
    assert result.steps == 2 and [len(s) for s in task.seen] == [4, 4, 2]
    first = step(init64(), grads(X[task.seen[0] + task.seen[1]]), 0.5)
    assert_params(task.before[2], first)
    assert_params(final["model"], step(first, grads(X[task.seen[2]]), 0.5))


# --------------------------------------------------------------------------------------------------
# EMA

def test_ema_after_each_step_is_decay_old_plus_one_minus_decay_new(tmp_path):
    task, result, final = train("train.batch_size=4", "train.ema_decay=0.75", tmp_path=tmp_path)
    p1 = step(init64(), grads(X[task.seen[0]]), 0.5)
    p2 = step(p1, grads(X[task.seen[1]]), 0.5)
    ema1 = {k: 0.75 * INIT[k].double() + 0.25 * p1[k] for k in INIT}
    ema2 = {k: 0.75 * ema1[k] + 0.25 * p2[k] for k in INIT}
    assert_params(final["model"], p2)
    assert_params(final["ema"], ema2)


def test_model_ema_copies_integer_buffers_and_averages_floats():
    model = nn.BatchNorm1d(2)
    ema = ModelEMA(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(-2.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)
    state = ema.state_dict()
    assert torch.allclose(state["weight"], torch.full((2,), 0.9 * 1.0 + 0.1 * 3.0))
    assert torch.allclose(state["running_mean"], torch.full((2,), 0.1 * -2.0))
    assert int(state["num_batches_tracked"]) == 7


# --------------------------------------------------------------------------------------------------
# learning-rate schedules, measured from the updates the optimiser made

def applied_lrs(task, final) -> list[float]:
    """lr of each update = -(change of u) / (gradient of u), on u's largest gradient component."""
    snapshots = [*task.before, {k: v for k, v in final["model"].items()}]
    lrs = []
    for s, rows in enumerate(task.seen):
        g = grads(X[rows])["u"]
        k = int(g.abs().argmax())
        lrs.append(-float(snapshots[s + 1]["u"][k].double() - snapshots[s]["u"][k].double()) / float(g[k]))
    return lrs


PEAK, MIN = 0.5, 0.05
COS = lambda p: MIN + (PEAK - MIN) * (1 + math.cos(math.pi * p)) / 2
# 8 rows, batches of 4: 2 steps per epoch, 4 epochs = 8 steps; e = step / 2 (in epochs)
SCHEDULES = {
    "constant, warmup 1 epoch from 0": (["train.scheduler.warmup_epochs=1"],
                                        [0.0, PEAK / 2] + [PEAK] * 6),
    "cosine to min_lr": ([f"train.scheduler.name=cosine", f"train.scheduler.min_lr={MIN}"],
                         [COS(s / 8) for s in range(8)]),
    "cosine, warmup 1 epoch from 0.1, prefix": (
        ["train.scheduler.name=cosine", f"train.scheduler.min_lr={MIN}", "train.scheduler.warmup_epochs=1",
         "train.scheduler.warmup_start_lr=0.1", "train.scheduler.warmup_prefix=true"],
        [0.1, 0.1 + (PEAK - 0.1) / 2] + [COS((s / 2 - 1) / 3) for s in range(2, 8)]),
    "cosine, warmup overlaid (timm)": (
        ["train.scheduler.name=cosine", f"train.scheduler.min_lr={MIN}", "train.scheduler.warmup_epochs=1"],
        [0.0, PEAK / 2] + [COS(s / 8) for s in range(2, 8)]),
    "linear to 0": (["train.scheduler.name=linear"], [PEAK * (1 - s / 8) for s in range(8)]),
    "step, halve every epoch": (["train.scheduler.name=step", "train.scheduler.gamma=0.5"],
                                [PEAK * 0.5 ** (s // 2) for s in range(8)]),
    "step every 1.5 epochs, gamma 0.1": (["train.scheduler.name=step", "train.scheduler.gamma=0.1",
                                          "train.scheduler.step_epochs=1.5"],
                                         [PEAK * 0.1 ** math.floor(s / 2 / 1.5) for s in range(8)]),
    "cosine per epoch": (["train.scheduler.name=cosine", f"train.scheduler.min_lr={MIN}",
                          "train.scheduler.interval=epoch"], [COS((s // 2) / 4) for s in range(8)]),
    "cosine over max_steps=6": (["train.scheduler.name=cosine", f"train.scheduler.min_lr={MIN}",
                                 "train.max_steps=6"], [COS(s / 6) for s in range(6)]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_each_update_uses_the_scheduled_lr(tmp_path, name):
    overrides, expected = SCHEDULES[name]
    task, result, final = train("train.batch_size=4", "train.epochs=4", *overrides, tmp_path=tmp_path)
    assert applied_lrs(task, final) == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# optimisers and weight decay

def test_sgd_weight_decay_spares_biases_vectors_and_flagged_parameters(tmp_path):
    task, _, final = train("train.batch_size=8", "train.optimizer.weight_decay=0.1", tmp_path=tmp_path)
    g = grads(X[:8])
    expected = step(init64(), g, 0.5)
    expected["W"] = INIT["W"].double() - 0.5 * (g["W"] + 0.1 * INIT["W"].double())
    assert_params(final["model"], expected)


@pytest.mark.parametrize("rule, decayed", [("timm", {"W", "F"}), ("everything", {"W", "F", "u", "b"})])
def test_weight_decay_rules_choose_what_decays(tmp_path, rule, decayed):
    extra = ["train.optimizer.exclude_flagged=false"]
    if rule == "everything":
        extra.append("train.optimizer.exclude_norm_and_bias=false")
    task, _, final = train("train.batch_size=8", "train.optimizer.weight_decay=0.1", *extra, tmp_path=tmp_path)
    g = grads(X[:8])
    expected = {k: INIT[k].double() - 0.5 * (g[k] + (0.1 * INIT[k].double() if k in decayed else 0)) for k in INIT}
    assert_params(final["model"], expected)


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_first_adam_step_and_its_weight_decay(tmp_path, name):
    # first Adam step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps). AdamW decays the weight
    # by lr * wd first (decoupled); Adam adds wd * w to the gradient (L2) before the moments.
    lr, wd, eps = 0.01, 0.2, 1e-8
    task, _, final = train("train.batch_size=8", f"train.optimizer.name={name}", f"train.optimizer.lr={lr}",
                           f"train.optimizer.weight_decay={wd}", tmp_path=tmp_path)
    g = grads(X[:8])
    expected = {}
    for key, p0 in init64().items():
        decays = key == "W"
        if name == "adamw":
            expected[key] = p0 * (1 - lr * wd if decays else 1) - lr * g[key] / (g[key].abs() + eps)
        else:
            gl = g[key] + (wd * p0 if decays else 0)
            expected[key] = p0 - lr * gl / (gl.abs() + eps)
    assert_params(final["model"], expected)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_over_two_steps(tmp_path, nesterov):
    task, _, final = train("train.batch_size=4", "train.optimizer.momentum=0.9",
                           f"train.optimizer.nesterov={str(nesterov).lower()}", tmp_path=tmp_path)
    g1, g2 = grads(X[task.seen[0]]), grads(X[task.seen[1]])
    expected = {}
    for key, p0 in init64().items():
        buf1 = g1[key]
        buf2 = 0.9 * buf1 + g2[key]
        d1 = g1[key] + 0.9 * buf1 if nesterov else buf1
        d2 = g2[key] + 0.9 * buf2 if nesterov else buf2
        expected[key] = p0 - 0.5 * d1 - 0.5 * d2
    assert_params(final["model"], expected)


# --------------------------------------------------------------------------------------------------
# precision

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_autocast_computes_the_gradient_in_bfloat16(tmp_path, precision):
    # every x is 1.01, which bfloat16 (8 significant bits) stores as 1.0078125; under autocast the matmuls see
    # that value, so u's gradient (the mean of x over 4 equal rows) is 1.0078125 instead of 1.01
    task, _, final = train("data.n=4", "data.x_value=1.01", "train.batch_size=4", "train.optimizer.lr=1",
                           f"train.precision={precision}", "train.device=cpu", tmp_path=tmp_path)
    seen = 1.0078125 if precision == "bf16" else 1.01
    assert torch.tensor(1.01).bfloat16().item() == 1.0078125
    torch.testing.assert_close(final["model"]["u"].double(), INIT["u"].double() - seen, rtol=0, atol=1e-6)
    assert final["model"]["u"].dtype == torch.float32                   # master weights stay float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 trains with a gradient scaler, on CUDA only")
def test_fp16_unscales_the_gradient_before_clipping(tmp_path):
    # X's rows, their products with 1/8 and the scaled gradients (< 65504) are exact in float16, so with the
    # scaler's 2**16 undone before clipping the step is the float32 one: lr * g * clip / |g|
    task, result, final = train("train.batch_size=8", "train.precision=fp16", "train.device=cuda",
                                "train.clip_grad_norm=0.5", "train.log_every_steps=1", tmp_path=tmp_path)
    g = grads(X[:8])
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))
    assert_params(final["model"], step(init64(), g, 0.5, min(1.0, 0.5 / norm)), atol=1e-5)
    assert [r["train/grad_norm"] for r in result.history if "train/grad_norm" in r] == [pytest.approx(norm, rel=1e-3)]


# --------------------------------------------------------------------------------------------------
# early stopping through the fit loop

class Scripted(LinTask):
    """Validation metric `val/score` (mode max) follows a script, one value per epoch."""
    script = [0.50, 0.55, 0.62, 0.60, 0.63, 0.70, 0.69, 0.68, 0.90, 0.95]

    def compute_metrics(self, outputs, split):
        self.val_calls = getattr(self, "val_calls", -1) + 1
        return {"score": self.script[self.val_calls] if split == "val" else 0.0}


def test_early_stopping_mode_max_min_delta_min_epochs(tmp_path):
    # an improvement needs +0.1 over the best: e1 0.50 (best), e2 0.55 (bad 1), e3 0.62 (best), then e4-e8 all
    # below 0.72 (bad 1..5). Patience 3 is reached at e6, but min_epochs=7 holds stopping off until an epoch
    # > 7 ends: it stops after e8, and e9's 0.90 is never seen.
    task, result, _ = train("train.batch_size=8", "train.epochs=10", "train.early_stopping.monitor=val/score",
                            "train.early_stopping.mode=max", "train.early_stopping.patience=3",
                            "train.early_stopping.min_delta=0.1", "train.early_stopping.min_epochs=7",
                            task_cls=Scripted, tmp_path=tmp_path)
    assert (result.epochs, result.stopped_early, result.best_epoch, result.best_value) == (8, True, 3, 0.62)
