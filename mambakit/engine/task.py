"""The small set of hooks an app gives the fit loop.

An app writes one `Task` subclass per kind of job (forecasting, MIL subtyping, ...). The engine owns
everything else: devices, DDP, samplers, precision, accumulation, clipping, EMA, schedules, checkpoints,
resume, early stopping, logging and plots. The engine calls, in order:

    model    = task.build_model()                    # an nn.Module on CPU; the engine moves and wraps it
    data     = task.build_datasets()                 # Datasets(train=..., val=..., test=...)
    loss     = task.training_step(model, batch)      # a scalar tensor, or (loss, {"name": float, ...})
    outputs  = task.eval_step(model, batch)          # {"name": per-sample tensor with batch as dim 0}
    metrics  = task.compute_metrics(outputs, split)  # on the outputs of the whole split, all ranks gathered

`eval_step` returns per-sample tensors so that metrics computed on the concatenation are exact under DDP
(sums of squared errors for MSE, scores and labels for AUC). Batches reach the hooks already on the device.
`compute_metrics` returns floats keyed without the split prefix; the engine logs them as `{split}/{key}`.

Apps that need two optimisers (a GAN discriminator) set `manual_optimization = True`, return their
optimisers from `configure_optimizers`, and implement `manual_step`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class Datasets:
    train: Dataset | None
    val: Dataset | None = None
    test: Dataset | None = None
    collate_fn: Callable | None = None         # default: torch's default_collate


class Task(abc.ABC):
    """Base class of every app task. `self.config` is the app's validated recipe (with `.train`, `.run`)."""

    #: Name used in run folders and logs, e.g. "timeseries".
    app: str = "app"
    #: Set True to drive the optimisers yourself in `manual_step`.
    manual_optimization: bool = False

    def __init__(self, config: Any):
        self.config = config

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        ...

    @abc.abstractmethod
    def build_datasets(self) -> Datasets:
        ...

    @abc.abstractmethod
    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        ...

    @abc.abstractmethod
    def eval_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        ...

    @abc.abstractmethod
    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        ...

    def configure_optimizers(self, model: nn.Module):
        """Return None to let the engine build the optimiser from `config.train.optimizer`
        (or a list of optimisers when `manual_optimization`)."""
        return None

    def manual_step(self, model: nn.Module, batch: Any, optimizers: list, step: "StepContext") -> dict[str, float]:
        raise NotImplementedError("manual_optimization=True needs manual_step()")

    def on_fit_end(self, model: nn.Module, run_dir) -> None:
        """Called on rank 0 after training: plots and extra artefacts."""


class StepContext:
    """What `manual_step` needs from the engine: `backward(loss)` (scaled, accumulation-aware),
    `step(optimizer)` (unscale, clip, step, update scaler) and `zero_grad(optimizer)`."""

    def backward(self, loss: torch.Tensor) -> None:  # pragma: no cover - implemented by the engine
        raise NotImplementedError

    def step(self, optimizer) -> None:  # pragma: no cover
        raise NotImplementedError

    def zero_grad(self, optimizer) -> None:  # pragma: no cover
        raise NotImplementedError
