"""The small set of hooks an app gives the fit loop.

An app writes one `Task` subclass per kind of job (forecasting, MIL subtyping, ...). The engine owns
everything else: devices, DDP, samplers, precision, accumulation, clipping, EMA, schedules, checkpoints,
resume, early stopping, logging and plots. The engine calls, in order:

    model    = task.build_model()                    # an nn.Module on CPU; the engine moves and wraps it
    data     = task.build_datasets()                 # Datasets(train=..., val=..., test=...)
    loss     = task.training_step(model, batch)      # a scalar tensor, or (loss, {"name": float, ...})
    outputs  = task.eval_step(model, batch)          # {"name": per-sample tensor with batch as dim 0}
    metrics  = task.compute_metrics(outputs, split)  # on the outputs of the whole split, all ranks gathered

`training_step` returns the MEAN loss over the batch's samples and must run the forward pass through
`model(...)` (under DDP `model` is the DistributedDataParallel wrapper; its gradient hooks live there).
`eval_step` returns per-sample tensors so that metrics computed on the concatenation are exact under DDP
(sums of squared errors for MSE, scores and labels for AUC); it receives the plain module (and the EMA copy).
Batches reach the hooks already on the device. `compute_metrics` returns floats keyed without the split
prefix; the engine logs them as `{split}/{key}` (`val_ema/{key}` for the EMA weights).

Apps that need two optimisers (a GAN discriminator) set `manual_optimization = True`, return their
optimisers from `configure_optimizers`, and implement `manual_step` (one process, grad_accum 1).

`finetune` loads pretrained weights through `load_pretrained` (override it to remap keys or interpolate
position embeddings).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

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
    #: Passed to DistributedDataParallel: True when some parameters get no gradient in a step.
    find_unused_parameters: bool = False

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

    def train_order(self, epoch: int, generator: torch.Generator):
        """The training-set indices to visit in `epoch`, in order; None (default) = a random permutation.
        Override for class-balanced sampling, e.g. `torch.multinomial(weights, len(weights), replacement=True,
        generator=generator)` (CLAM/MambaMIL's weighted sampler). Draw only from `generator` (seeded by run
        seed and epoch), so every process and every resume gets the same order; keep the length fixed."""
        return None

    def configure_optimizers(self, model: nn.Module):
        """Return None to let the engine build the optimiser from `config.train.optimizer`
        (or a list of optimisers when `manual_optimization`)."""
        return None

    def manual_step(self, model: nn.Module, batch: Any, optimizers: list, step: "StepContext") -> dict[str, float]:
        """One optimisation step with your own optimisers; return floats to log (`loss` is shown in the
        progress bar). Use `step.backward(loss)`, `step.step(optimizer)` and `step.zero_grad(optimizer)` so
        that mixed precision and clipping work."""
        raise NotImplementedError("manual_optimization=True needs manual_step()")

    def load_pretrained(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> "PretrainedReport":
        """Load pretrained weights into the freshly built `model` for fine-tuning. Default: every tensor
        whose key and shape match is loaded; tensors with another shape (a classifier head for a different
        number of classes) are skipped, and the report lists what was skipped or missing."""
        return load_matching(model, state_dict)

    def on_fit_end(self, model: nn.Module, run_dir) -> None:
        """Called on rank 0 after training: plots and extra artefacts."""


@dataclass
class PretrainedReport:
    """What fine-tuning took from pretrained weights. The engine prints `summary()` when the run starts and
    keeps it in summary.json's notes; it fills `fresh`, `source` and `available` when a task leaves them out."""
    loaded: list[str] = field(default_factory=list)           # model keys that got a pretrained tensor
    skipped_shape: list[str] = field(default_factory=list)    # "key: checkpoint (a, b) vs model (c, d)"
    missing: list[str] = field(default_factory=list)          # model keys the weights did not provide
    unexpected: list[str] = field(default_factory=list)       # weight keys the model does not have
    fresh: list[str] = field(default_factory=list)            # model keys left as initialised (e.g. the head)
    source: str = ""                                          # where the weights came from
    available: int | None = None                              # tensors in the weights

    def summary(self, limit: int = 8) -> str:
        held = f" of the {self.available} tensors in the weights" if self.available is not None else ""
        lines = [f"pretrained weights from {self.source or 'the given state dict'}: loaded {len(self.loaded)} "
                 f"tensors{held}"]
        fresh = self.fresh or [*self.missing, *(item.split(":")[0] for item in self.skipped_shape)]
        for title, items in (("left fresh (as initialised)", fresh),
                             ("dropped from the weights, shape mismatch", self.skipped_shape),
                             ("dropped from the weights, unused by the model", self.unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                lines.append(f"{title}: {len(items)}: {shown}")
        return "\n".join(lines)


def load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> PretrainedReport:
    """Load the tensors of `state_dict` whose key and shape match `model`'s; report the rest. A leading
    `module.` (weights saved from a DDP wrapper) is stripped. Loading nothing at all is an error."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    own = model.state_dict()
    report = PretrainedReport()
    usable = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.skipped_shape.append(f"{key}: weights {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [key for key in own if key not in state_dict]
    report.fresh = [key for key in own if key not in usable]
    if not usable:
        example = ", ".join(list(state_dict)[:5])
        raise ValueError(f"none of the {len(state_dict)} pretrained tensors matches the model by key and shape "
                         f"(weight keys start: {example}; model keys start: {', '.join(list(own)[:5])})")
    model.load_state_dict(usable, strict=False)
    return report


class StepContext:
    """What `manual_step` needs from the engine: `backward(loss)` (loss scaling for fp16),
    `step(optimizer)` (unscale, clip, step) and `zero_grad(optimizer)`. The engine updates the scaler,
    the schedulers and the EMA after `manual_step` returns. `global_step` is the number of optimiser steps
    done before this one."""

    global_step: int = 0

    def backward(self, loss: torch.Tensor) -> None:  # pragma: no cover - implemented by the engine
        raise NotImplementedError

    def step(self, optimizer) -> None:  # pragma: no cover
        raise NotImplementedError

    def zero_grad(self, optimizer) -> None:  # pragma: no cover
        raise NotImplementedError
