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
    # Biases, norm weights and parameters flagged `_no_weight_decay` (A_log, D) get no weight decay,
    # as in mamba_ssm and timm. Off reproduces recipes that decay everything (TSLib's Adam has wd=0 anyway).
    exclude_norm_and_bias: bool = True

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, evaluated per optimiser step (epochs may be fractional).

    constant: lr.  cosine: lr -> min_lr over the run.  linear: lr -> min_lr linearly.
    step: lr * gamma ** floor(epoch / step_epochs) (TSLib's `lradj=type1` is step_epochs=1, gamma=0.5).
    All of them can start with a linear warmup from warmup_start_lr over warmup_epochs.
    """
    name: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0
    step_epochs: float = 1.0
    gamma: float = 0.5

    def __post_init__(self):
        if self.warmup_epochs < 0 or self.step_epochs <= 0:
            raise ValueError("warmup_epochs must be >= 0 and step_epochs > 0")


@dataclass
class EarlyStoppingConfig:
    """Stop when `monitor` (a key of the validation metrics, e.g. 'val/loss') has not improved by more
    than `min_delta` for `patience` evaluations. patience: null turns it off. The best checkpoint is kept."""
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int | None = None
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None          # stop after this many optimiser steps (for quick runs)
    batch_size: int = 32                  # global batch per micro-step, split evenly over ranks
    eval_batch_size: int | None = None    # default: batch_size
    grad_accum: int = 1                   # micro-steps per optimiser step
    clip_grad_norm: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # autocast; fp16 only on CUDA (with a scaler)
    ema_decay: float | None = None        # keep an EMA of the weights; evaluated alongside the model
    eval_every_epochs: int = 1
    checkpoint_every_steps: int | None = None   # in addition to every epoch end
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
        for name in ("epochs", "batch_size", "grad_accum", "eval_every_epochs", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RunConfig:
    out_dir: str = "runs"                 # runs land in out_dir/name
    name: str | None = None               # default: <app>-<recipe>-<timestamp>
    tensorboard: bool = True              # used when tensorboard is installed
    progress: bool = True                 # tqdm bars on rank 0
