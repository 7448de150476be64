"""Optimisers with weight-decay exclusions, and learning-rate schedules evaluated per optimiser step.

Weight decay is not applied to (as in timm's `param_groups_weight_decay` and mamba_ssm):
  - with `exclude_norm_and_bias`: every parameter with ndim <= 1 (biases, norm weights, D) or a name ending
    in `.bias`, and the names returned by `model.no_weight_decay()` (timm's convention: pos_embed, cls_token);
  - with `exclude_flagged`: parameters carrying `_no_weight_decay = True` (mamba_ssm's A_log and D).
    timm's optimiser factory ignores that flag, so a recipe reproducing a timm-trained model (Vim) sets
    `exclude_flagged: false`.

The schedule is a pure function of the optimiser-step index (`lr_at`), so resuming needs only the step count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .schema import OptimizerConfig, SchedulerConfig

__all__ = ["parameter_groups", "build_optimizer", "lr_at", "Scheduler"]


def parameter_groups(model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool = True,
                     exclude_flagged: bool = True) -> list[dict[str, Any]]:
    """Split trainable parameters into a no-decay group and a decayed group (empty groups are dropped).
    Parameters are passed as (name, tensor) pairs, so torch records each group's `param_names`."""
    named_skips = set(getattr(model, "no_weight_decay", lambda: ())()) if exclude_norm_and_bias else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = (
            weight_decay == 0
            or (exclude_norm_and_bias and (param.ndim <= 1 or name.endswith(".bias") or name in named_skips))
            or (exclude_flagged and getattr(param, "_no_weight_decay", False))
        )
        (no_decay if skip else decay).append((name, param))
    groups = []
    for params, wd in ((no_decay, 0.0), (decay, weight_decay)):
        if params:
            groups.append({"params": params, "weight_decay": wd})
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.exclude_norm_and_bias, config.exclude_flagged)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                 weight_decay=config.weight_decay)
    if config.name == "adam":
        # torch's Adam adds weight_decay * param to the gradient (L2), not decoupled decay; as in TSLib/CLAM.
        return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    raise ValueError(f"train.optimizer.name: unknown optimizer {config.name!r}")


def lr_at(config: SchedulerConfig, peak_lr: float, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate of the update with 0-based index `step`.

    Time is measured in epochs, e = step / steps_per_epoch (floored to whole epochs when
    interval='epoch'). Warmup: for e < warmup_epochs, lr rises linearly from warmup_start_lr to peak_lr.
    Afterwards, with progress p in [0, 1] (p = e / E, or (e - W) / (E - W) when warmup_prefix, E = the
    run's length in epochs, W = warmup_epochs):
      constant: peak;  cosine: min + (peak - min) * (1 + cos(pi p)) / 2;  linear: peak + (min - peak) * p;
      step: peak * gamma ** floor(e / step_epochs);  multistep: peak * gamma ** #{milestones <= e}.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    epoch = step / steps_per_epoch
    if config.interval == "epoch":
        epoch = float(step // steps_per_epoch)
    warmup = config.warmup_epochs
    if epoch < warmup:
        return config.warmup_start_lr + (peak_lr - config.warmup_start_lr) * epoch / warmup
    if config.name == "constant":
        return peak_lr
    if config.name == "step":
        # The tolerance keeps epoch boundaries exact when step_epochs is not a power of two.
        return peak_lr * config.gamma ** math.floor(epoch / config.step_epochs + 1e-9)
    if config.name == "multistep":
        return peak_lr * config.gamma ** sum(epoch + 1e-9 >= m for m in config.milestones)
    total_epochs = total_steps / steps_per_epoch
    if config.warmup_prefix:
        span, done = total_epochs - warmup, epoch - warmup
    else:
        span, done = total_epochs, epoch
    progress = 1.0 if span <= 0 else min(max(done / span, 0.0), 1.0)
    if config.name == "cosine":
        return config.min_lr + 0.5 * (peak_lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))
    if config.name == "linear":
        return peak_lr + (config.min_lr - peak_lr) * progress
    raise ValueError(f"train.scheduler.name: unknown schedule {config.name!r}")


class Scheduler:
    """Sets each param group's lr to `initial_lr * lr_at(step) / peak_lr` before every update, so groups
    with their own lr (layer decay, a second model) keep their ratio to the configured lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: SchedulerConfig, peak_lr: float,
                 steps_per_epoch: int, total_steps: int):
        self.optimizer = optimizer
        self.config = config
        self.peak_lr = peak_lr
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = max(total_steps, 1)
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def current_lr(self) -> float:
        return lr_at(self.config, self.peak_lr, self.step_count, self.steps_per_epoch, self.total_steps)

    def _apply(self) -> None:
        factor = self.current_lr() / self.peak_lr
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        """Call after each optimiser update; sets the lr of the next one."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()

