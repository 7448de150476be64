"""Optimisers from config, weight-decay groups, and learning-rate schedules at given steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mambakit.engine.optim import Scheduler, build_optimizer, lr_at, parameter_groups
from mambakit.engine.schema import OptimizerConfig, SchedulerConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2, bias=False)
        self.A_log = nn.Parameter(torch.zeros(8, 3))
        self.A_log._no_weight_decay = True
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    def no_weight_decay(self):
        return {"pos_embed"}


def names(groups):
    return [(sorted(g["params"][i][0] for i in range(len(g["params"]))), g["weight_decay"]) for g in groups]


def test_weight_decay_groups_default():
    groups = parameter_groups(Net(), 0.05)
    assert names(groups) == [(["A_log", "embed.bias", "norm.bias", "norm.weight", "pos_embed"], 0.0),
                             (["embed.weight", "head.weight"], 0.05)]


def test_weight_decay_groups_timm_rule_ignores_the_flag():
    groups = parameter_groups(Net(), 0.05, exclude_flagged=False)
    assert names(groups) == [(["embed.bias", "norm.bias", "norm.weight", "pos_embed"], 0.0),
                             (["A_log", "embed.weight", "head.weight"], 0.05)]


def test_weight_decay_everything_and_nothing():
    groups = parameter_groups(Net(), 0.05, exclude_norm_and_bias=False, exclude_flagged=False)
    assert names(groups) == [(["A_log", "embed.bias", "embed.weight", "head.weight", "norm.bias", "norm.weight",
                               "pos_embed"], 0.05)]
    assert names(parameter_groups(Net(), 0.0))[0][1] == 0.0 and len(parameter_groups(Net(), 0.0)) == 1


def test_weight_decay_matches_timm_for_the_rule_they_share():
    from timm.optim import param_groups_weight_decay
    model = Net()
    ours = parameter_groups(model, 0.1, exclude_flagged=False)
    theirs = param_groups_weight_decay(model, 0.1, no_weight_decay_list=model.no_weight_decay())
    by_decay = lambda groups, get: {g["weight_decay"]: {id(get(p)) for p in g["params"]} for g in groups}
    assert by_decay(ours, lambda p: p[1]) == by_decay(theirs, lambda p: p)


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(model, 0.1)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_build_optimizer(name, cls):
    config = OptimizerConfig(name=name, lr=0.01, weight_decay=0.2, betas=(0.8, 0.9), momentum=0.5, nesterov=True)
    optimizer = build_optimizer(Net(), config)
    assert type(optimizer) is cls
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.2]
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    assert optimizer.param_groups[1]["param_names"] == ["embed.weight", "head.weight"]
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.5 and optimizer.param_groups[0]["nesterov"]
    else:
        assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)


def sched(**kw):
    return SchedulerConfig(**kw)


def test_step_schedule_halves_every_epoch_like_tslib_type1():
    # TSLib lradj=type1: lr * 0.5 ** (epoch - 1) for 1-based epochs, i.e. each epoch's steps share one lr.
    config = sched(name="step", step_epochs=1, gamma=0.5)
    spe = 7
    for step in range(4 * spe):
        assert lr_at(config, 1e-3, step, spe, 100) == pytest.approx(1e-3 * 0.5 ** (step // spe), rel=1e-12)


def test_step_schedule_with_fractional_and_multi_epoch_periods():
    assert lr_at(sched(name="step", step_epochs=2, gamma=0.1), 1.0, 39, 10, 100) == pytest.approx(0.1)
    assert lr_at(sched(name="step", step_epochs=2, gamma=0.1), 1.0, 40, 10, 100) == pytest.approx(0.01)
    # step_epochs 0.3 with 10 steps per epoch: drops at steps 3, 6, 9 (exactly, despite 0.3 not being binary)
    values = [lr_at(sched(name="step", step_epochs=0.3, gamma=0.5), 1.0, s, 10, 100) for s in range(10)]
    assert values == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]


def test_linear_warmup_then_constant():
    config = sched(name="constant", warmup_epochs=2, warmup_start_lr=1e-4)
    spe = 5
    expected = [1e-4 + (1e-3 - 1e-4) * s / 10 for s in range(10)] + [1e-3] * 5
    got = [lr_at(config, 1e-3, s, spe, 100) for s in range(15)]
    assert got == pytest.approx(expected, rel=1e-12)


def test_cosine_values():
    config = sched(name="cosine", min_lr=1e-5)
    total = 100
    assert lr_at(config, 1e-3, 0, 10, total) == pytest.approx(1e-3)
    assert lr_at(config, 1e-3, 50, 10, total) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(config, 1e-3, 25, 10, total) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(config, 1e-3, 100, 10, total) == pytest.approx(1e-5)
    assert lr_at(config, 1e-3, 150, 10, total) == pytest.approx(1e-5)   # clamped after the end


@pytest.mark.parametrize("prefix", [False, True])
def test_cosine_with_warmup_matches_timm_per_step(prefix):
    from timm.scheduler import CosineLRScheduler
    spe, epochs, warmup = 6, 10, 2
    total = spe * epochs
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=5e-4)
    timm_sched = CosineLRScheduler(optimizer, t_initial=total - (warmup * spe if prefix else 0), lr_min=1e-5,
                                   warmup_t=warmup * spe, warmup_lr_init=1e-6, warmup_prefix=prefix,
                                   t_in_epochs=False)
    config = sched(name="cosine", min_lr=1e-5, warmup_epochs=warmup, warmup_start_lr=1e-6, warmup_prefix=prefix)
    for step in range(total):
        assert lr_at(config, 5e-4, step, spe, total) == pytest.approx(timm_sched._get_lr(step)[0], rel=1e-12)


def test_cosine_per_epoch_interval_matches_timm_in_epochs():
    from timm.scheduler import CosineLRScheduler
    spe, epochs = 4, 8
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    timm_sched = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=1e-6, warmup_t=2, warmup_lr_init=1e-5)
    config = sched(name="cosine", min_lr=1e-6, warmup_epochs=2, warmup_start_lr=1e-5, interval="epoch")
    for step in range(spe * epochs):
        assert lr_at(config, 1e-3, step, spe, spe * epochs) == pytest.approx(timm_sched._get_lr(step // spe)[0])


def test_linear_decay_with_warmup_prefix_matches_hugging_face_formula():
    # transformers.get_linear_schedule_with_warmup: lr * s / W during warmup, then lr * (T - s) / (T - W)
    total, warmup_steps, spe = 50, 5, 10
    config = sched(name="linear", warmup_epochs=warmup_steps / spe, warmup_prefix=True)
    for step in range(total):
        expected = 2e-4 * (step / warmup_steps if step < warmup_steps else (total - step) / (total - warmup_steps))
        assert lr_at(config, 2e-4, step, spe, total) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_scheduler_keeps_group_ratios_and_resumes_from_its_step():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-4}], lr=1e-3)
    config = sched(name="cosine")
    scheduler = Scheduler(optimizer, config, peak_lr=1e-3, steps_per_epoch=10, total_steps=40)
    for _ in range(20):
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-5])
    fresh_optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-4}])
    fresh = Scheduler(fresh_optimizer, config, 1e-3, 10, 40)
    fresh.load_state_dict(scheduler.state_dict())
    assert [g["lr"] for g in fresh_optimizer.param_groups] == pytest.approx([5e-4, 5e-5])


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="step_epochs must be > 0"):
        SchedulerConfig(step_epochs=0)
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        SchedulerConfig(warmup_epochs=-1)


def test_multistep_schedule_decays_at_each_milestone():
    from mambakit.engine.optim import lr_at
    from mambakit.engine.schema import SchedulerConfig

    cfg = SchedulerConfig(name="multistep", milestones=[2, 3], gamma=0.1)
    lrs = [lr_at(cfg, 1.0, step, steps_per_epoch=4, total_steps=20) for step in (0, 7, 8, 11, 12, 19)]
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="ascending milestones"):
        SchedulerConfig(name="multistep", milestones=[])
