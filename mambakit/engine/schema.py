"""The config sections every recipe shares: `train:` (optimisation, precision, stopping) and `run:` (where
results go). An app's recipe schema is a dataclass with its own `data:` and `model:` sections plus these two:

    @dataclass
    class ForecastRecipe:
        data: ForecastData
        model: SMambaConfig | ITransformerConfig | DLinearConfig
        train: TrainConfig = field(default_factory=TrainConfig)
        run: RunConfig = field(default_factory=RunConfig)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9          # sgd only
    nesterov: bool = False         # sgd only
    # No weight decay for parameters with ndim <= 1 or named *.bias, and for model.no_weight_decay() names
    # (timm's rule). Off reproduces recipes that decay everything (TSLib's Adam has wd=0 anyway).
    exclude_norm_and_bias: bool = True
    # No weight decay for parameters flagged `_no_weight_decay` (mamba_ssm's A_log, D). timm's optimiser
    # factory ignores the flag, so recipes reproducing timm-trained models (Vim) set this false.
    exclude_flagged: bool = True

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, set before every optimiser step (see engine/optim.py `lr_at`).

    constant: lr.  cosine: lr -> min_lr over the run.  linear: lr -> min_lr linearly.
    step: lr * gamma ** floor(epoch / step_epochs) (TSLib's `lradj=type1` is step_epochs=1, gamma=0.5).
    multistep: lr * gamma ** (the number of `milestones` epochs passed) (PointNeXt / PCM ShapeNetPart:
    milestones [210, 270], gamma 0.1).
    All of them can start with a linear warmup from warmup_start_lr over warmup_epochs.
    The run's length is epochs (or max_steps when that is shorter).
    """
    name: Literal["constant", "cosine", "linear", "step", "multistep"] = "constant"
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0
    step_epochs: float = 1.0
    gamma: float = 0.5
    milestones: list[float] = field(default_factory=list)     # multistep only: epochs where lr *= gamma
    # False (timm's default): cosine/linear progress is measured from step 0 and warmup overlays its start.
    # True (Hugging Face, torchtune): the decay starts when warmup ends.
    warmup_prefix: bool = False
    # "step": the time variable moves every optimiser step (fractional epochs); "epoch": it moves only at
    # epoch boundaries, as with timm schedulers stepped once per epoch.
    interval: Literal["step", "epoch"] = "step"

    def __post_init__(self):
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.step_epochs <= 0:
            raise ValueError(f"step_epochs must be > 0, got {self.step_epochs}")
        if self.min_lr < 0 or self.warmup_start_lr < 0:
            raise ValueError("min_lr and warmup_start_lr must be >= 0")
        if self.name == "multistep" and (not self.milestones or list(self.milestones) != sorted(self.milestones)):
            raise ValueError(f"scheduler multistep needs ascending milestones (epochs), got {self.milestones}")


@dataclass
class EarlyStoppingConfig:
    """Track the best value of `monitor` (a logged validation metric such as 'val/loss' or 'val_ema/acc')
    and keep its checkpoint. A value counts as an improvement when it is at least as good as the best so far
    by `min_delta` (mode min: value <= best - min_delta; ties improve, as in TSLib's and CLAM's
    EarlyStopping). With `patience` set, training stops once `patience` evaluations in a row did not improve,
    but never before `min_epochs` epochs have completed (CLAM's stop_epoch=S is min_epochs=S+1).
    `restore_best`: the final evaluation (test split) and on_fit_end use the best weights."""
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int | None = None
    min_delta: float = 0.0
    min_epochs: int = 0
    restore_best: bool = True

    def __post_init__(self):
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or null, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None          # stop after this many optimiser steps (for quick runs)
    batch_size: int = 32                  # global batch per micro-step, split evenly over ranks
    drop_last: bool = True                # drop the last partial training batch (timm, TSLib train loaders)
    eval_batch_size: int | None = None    # default: batch_size
    grad_accum: int = 1                   # micro-steps per optimiser step
    clip_grad_norm: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # autocast; fp16 only on CUDA (with a scaler)
    ema_decay: float | None = None        # keep an EMA of the weights; evaluated alongside the model
    # Mamba-1 mixers recompute their in_proj output and per-order intermediates in backward instead of keeping
    # them, and the norm in front of each its output (core.set_memory_efficient): up to half the peak memory
    # (MambaMIL, 100k patches: 4.7 instead of 8.1 GiB; Vim-Ti training at 1024 px, batch 1: 0.9 instead of
    # 1.25 GiB), same numbers; MambaMIL time +9% at 10k patches, +15% at 50k, the same at 100k (2 threads;
    # benchmarks/README.md).
    memory_efficient: bool = False
    eval_every_epochs: int = 1
    checkpoint_every_steps: int | None = None   # in addition to every epoch end
    # Also checkpoint mid-epoch once this many minutes passed since the last checkpoint (or the start), so a
    # crash in a long epoch -- or in a quick recipe's single epoch -- loses at most this much work. null: off.
    checkpoint_every_minutes: float | None = 5.0
    keep_checkpoints: int = 2
    num_workers: int = 0
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every_steps: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "eval_every_epochs", "keep_checkpoints",
                     "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_batch_size", "checkpoint_every_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")
        minutes = self.checkpoint_every_minutes
        if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
            raise ValueError(f"checkpoint_every_minutes must be > 0 or null, got {minutes}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class RunConfig:
    out_dir: str = "runs"                 # runs land in out_dir/name
    name: str | None = None               # default: <app>-<recipe>-<timestamp>
    tensorboard: bool = True              # used when tensorboard is installed
    progress: bool = True                 # tqdm bars on rank 0
    curves: bool = True                   # write curves.png at the end
