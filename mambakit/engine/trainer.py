"""The fit loop every app trains through.

    result = Trainer(task).fit("runs/etth1-smamba")             # or fit(run_dir, resume=True)
    metrics = evaluate(task, "runs/etth1-smamba", split="test")  # a run folder, checkpoint file or module

One optimiser step = `grad_accum` micro-batches of `train.batch_size` samples (the global batch, split over
the ranks). The loss of each micro-batch is divided by the number of micro-batches in its accumulation
window, and under DDP weighted by the rank's share of the batch, so the gradient equals the one-process
gradient of the same samples. DDP's all-reduce runs only on the last micro-batch of a window (`no_sync`).

The run folder:
    config.yaml      the resolved recipe          metrics.jsonl / metrics.csv   every logged row
    checkpoints/     see engine/checkpoint.py     curves.png                    training curves (end)
    summary.json     final and best metrics, paths, timings
    tensorboard/     when tensorboard is installed

A checkpoint holds: format, app, model, ema, optimizers, schedulers, scaler, rng (one entry per rank),
world_size, progress {epoch, step, batch_in_epoch, stopped_early}, early_stopping (best value, epoch,
step, file, bad-evaluation count), history (every logged row) and config (the recipe as plain data).
`epoch` counts completed epochs; `batch_in_epoch` is the number of global micro-batches of epoch `epoch`
already trained on, so a resume restarts the epoch's permutation at that offset. Checkpoints are taken at each
epoch end (after its evaluation), every `checkpoint_every_steps` optimiser steps, and after the first optimiser
step that ends `checkpoint_every_minutes` after the previous checkpoint (the default, 5 minutes, makes long
epochs and single-epoch quick recipes resumable). Under DDP rank 0's clock decides, so all ranks save together.

The run folder is created only once the run has started (model, data, weights, resume checkpoint all ready):
a start that fails leaves no folder behind, and one that fails before writing any checkpoint or metric row
removes what the engine put into a folder it created. At the end the engine lists every file in the run
folder with its size (checkpoints, logs, curves, and what the task's on_fit_end wrote: plots, heatmaps).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mambakit.runtime import restore_threads

from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, checkpoint_name, find_resume_checkpoint,
                         load_checkpoint, prune_checkpoints, resolve_checkpoint, save_checkpoint,
                         write_pointer)
from .config import save_config, to_dict
from .distributed import (DistEnv, EpochBatchSampler, epoch_generator, SeededSamples, ShardSampler, all_gather_object,
                          all_reduce_sum, barrier, broadcast_object, gather_outputs, init_distributed,
                          split_sizes, world_size)
from .ema import ModelEMA
from .logs import RunLogger, format_artefacts, format_metrics, list_artefacts
from .optim import Scheduler, build_optimizer
from .plots import plot_curves
from .schema import EarlyStoppingConfig, RunConfig, TrainConfig
from .seed import capture_rng_state, restore_rng_state, sample_seed, seed_everything
from .task import Datasets, PretrainedReport, StepContext, Task

__all__ = ["Trainer", "FitResult", "evaluate", "NonFiniteLossError", "BestTracker", "move_to_device",
           "load_model_state", "read_pretrained_weights"]


# --------------------------------------------------------------------------------------------------
# small helpers

def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors, and containers of them (dict, list, tuple, namedtuple), or anything with `.to(device)`
    (e.g. a PyTorch Geometric batch), moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
        return moved if type(batch) is dict else type(batch)(moved)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    to = getattr(batch, "to", None)
    if callable(to):
        return to(device)
    return batch


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA (it trains with a gradient scaler); on CPU use "
                         "train.precision=bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision=bf16: GPU {torch.cuda.get_device_name(device)} does not support "
                         "bfloat16; use fp16 or fp32")


class NonFiniteLossError(FloatingPointError, ValueError):
    """The training loss became NaN or infinite (a ValueError too, so the CLI prints one line)."""


def _set_memory_efficient(module: nn.Module) -> None:
    from mambakit.core.mamba import set_memory_efficient

    if set_memory_efficient(module) == 0:
        raise ValueError(f"train.memory_efficient=true, but the model ({type(module).__name__}) has no Mamba-1 "
                         f"mixers to make memory-efficient; set it to false for this model")


def _check_batch_divisible(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} is the global batch per micro-step and must be "
                         f"divisible by the world size {world} (torchrun --nproc_per_node x --nnodes)")


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that lists what does not match (a checkpoint of another model)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise CheckpointError(f"{source} does not match the model (is it from a different model or "
                              f"config?): " + "; ".join(parts))
    model.load_state_dict(state)


def read_pretrained_weights(spec: str | Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict from a zoo name or a file: a mambakit checkpoint or run folder (verified), a dict with a
    'model' or 'state_dict' entry (Vim/DeiT, Lightning, zoo.save_pretrained), or a bare state dict. A
    registered zoo name is built and converted by `mambakit.zoo.load_pretrained`.
    Returns (state_dict, description)."""
    path = Path(spec)
    if not path.exists():
        return _zoo_state_dict(str(spec))
    if path.is_dir():
        path = resolve_checkpoint(path, prefer="best")
    if path.with_name(path.name + ".sha256").is_file():
        state = load_checkpoint(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"could not read pretrained weights {path} with torch.load(weights_only=True): "
                             f"{type(e).__name__}: {e}. Upstream checkpoints that pickle other objects are "
                             "converted through the model zoo (mambakit zoo).") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        if use_ema and state.get("ema") is None:
            raise ValueError(f"{path} holds no EMA weights (the run had train.ema_decay unset)")
        return state["ema"] if use_ema else state["model"], f"{path} ({'EMA' if use_ema else 'model'} weights)"
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), Mapping):
            return dict(state[key]), f"{path} [{key!r}]"
    if isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values()):
        return dict(state), str(path)
    raise ValueError(f"{path} holds no state dict (expected a mambakit checkpoint, a dict with 'model' or "
                     "'state_dict', or a mapping of tensors)")


def _zoo_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """Weights registered in mambakit.zoo, built and converted there (the zoo's own config and head)."""
    try:
        from mambakit import zoo
    except ImportError:
        zoo = None
    if zoo is None or not hasattr(zoo, "get_weights") or not hasattr(zoo, "load_pretrained"):
        raise FileNotFoundError(f"pretrained weights {name!r}: no such file (named weights need mambakit.zoo, "
                                "which this installation lacks)")
    try:
        zoo.get_weights(name)
    except KeyError as e:
        raise FileNotFoundError(f"pretrained weights {name!r}: no such file, and not a registered name "
                                f"(`mambakit zoo list`): {e}") from None
    return zoo.load_pretrained(name).state_dict(), f"zoo weights {name!r}"


@dataclass
class BestTracker:
    """Best value of the monitored metric, and early stopping on it (see EarlyStoppingConfig)."""
    config: EarlyStoppingConfig
    best: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    best_file: str | None = None
    bad_evals: int = 0
    warned_missing: bool = False

    def update(self, metrics: Mapping[str, float], epoch: int, step: int) -> tuple[bool, bool]:
        """Returns (improved, should_stop) after the evaluation that ended `epoch`."""
        monitor = self.config.monitor
        if monitor not in metrics:
            if self.config.patience is not None:
                raise ValueError(f"train.early_stopping.monitor={monitor!r} is not among the validation "
                               f"metrics: {', '.join(sorted(metrics))}")
            return False, False
        value = float(metrics[monitor])
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.config.mode == "min":
            improved = value <= self.best - self.config.min_delta
        else:
            improved = value >= self.best + self.config.min_delta
        if improved:
            self.best, self.best_epoch, self.best_step, self.bad_evals = value, epoch, step, 0
        else:
            self.bad_evals += 1
        patience = self.config.patience
        stop = patience is not None and self.bad_evals >= patience and epoch > self.config.min_epochs
        return improved, stop

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step,
                "best_file": self.best_file, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("best", "best_epoch", "best_step", "best_file", "bad_evals"):
            setattr(self, key, state[key])


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, float]              # validation metrics of the final weights, plus test metrics
    best_metric: str | None = None         # the monitored key
    best_value: float | None = None
    best_epoch: int | None = None
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    epochs: int = 0                        # completed epochs
    steps: int = 0                         # optimiser steps
    stopped_early: bool = False
    wall_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    artefacts: list[tuple[str, int]] = field(default_factory=list)   # (path in the run folder, bytes)


@dataclass
class _Progress:
    epoch: int = 0                 # completed epochs
    step: int = 0                  # optimiser steps done
    batch_in_epoch: int = 0        # global micro-batches of epoch `epoch` already trained on
    stopped_early: bool = False


class _EngineStepContext(StepContext):
    def __init__(self, trainer: "Trainer", scale: float):
        self.trainer = trainer
        self.scale = scale
        self.global_step = trainer.progress.step

    def backward(self, loss: torch.Tensor) -> None:
        self.trainer.scaler.scale(loss * self.scale).backward()

    def step(self, optimizer) -> None:
        self.trainer._clip_and_step(optimizer)

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# the trainer

class Trainer:
    """Trains `task` (see engine/task.py). `pretrained`: a zoo name, checkpoint or state-dict file loaded
    through `task.load_pretrained` into the freshly built model (fine-tuning; ignored when resuming).
    `clock`: seconds from a monotonic clock, read for the time-triggered checkpoints (tests inject one)."""

    def __init__(self, task: Task, *, pretrained: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.task = task
        self.pretrained = pretrained
        self.clock = clock
        self.train_cfg: TrainConfig = getattr(task.config, "train", None) or TrainConfig()
        self.run_cfg: RunConfig = getattr(task.config, "run", None) or RunConfig()

    # ------------------------------------------------------------------------------------------------
    def fit(self, run_dir: str | Path | None = None, resume: bool = False, *,
            name_hint: str | None = None) -> FitResult:
        """Train and evaluate; `run_dir` None means run.out_dir/(run.name or <name_hint>-<time>)."""
        cfg = self.train_cfg
        started = time.time()
        _check_batch_divisible(cfg.batch_size, world_size())
        self.env = env = init_distributed(cfg.device)
        _check_precision(cfg.precision, env.device)
        self.run_dir = self._resolve_run_dir(run_dir, resume, name_hint)
        self.ckpt_dir = self.run_dir / "checkpoints"

        seed_everything(cfg.seed, cfg.deterministic)
        module = self.task.build_model()
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self.task).__name__}.build_model() must return an nn.Module, got "
                            f"{type(module).__name__}")
        if cfg.memory_efficient:
            _set_memory_efficient(module)
        self.datasets = self._check_datasets(self.task.build_datasets())
        if self.pretrained is not None and not resume:
            self._load_pretrained(module)
        self.module = module.to(env.device)
        self.model = self._wrap(self.module)
        self.optimizers = self._build_optimizers()
        self.epoch_len = len(self._epoch_order(0) or self.datasets.train)
        self.batches_per_epoch = EpochBatchSampler.batches_per_epoch(self.epoch_len, cfg.batch_size, cfg.drop_last)
        self._check_batches()
        self.steps_per_epoch = -(-self.batches_per_epoch // cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.schedulers = [Scheduler(opt, cfg.scheduler, cfg.optimizer.lr, self.steps_per_epoch, self.total_steps)
                           for opt in self.optimizers]
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
        self.ema = ModelEMA(self.module, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.progress = _Progress()
        self.tracker = BestTracker(cfg.early_stopping)
        history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None

        if resume:
            history = self._resume()
        else:
            seed_everything(sample_seed(cfg.seed, 1, env.rank))  # the training stream, distinct per rank

        # Everything the run needs is ready: only now does the run folder appear.
        created = _on_main(lambda: _make_dirs(self.run_dir), env) or []
        self.logger = None
        try:
            self.logger = RunLogger(self.run_dir, enabled=env.is_main, tensorboard=self.run_cfg.tensorboard,
                                    progress=self.run_cfg.progress, history=history)
            if env.is_main:
                save_config(self.task.config, self.run_dir / "config.yaml")
                self.logger.message(f"run folder: {self.run_dir}  ({env.world_size} process(es) on "
                                    f"{env.device.type}, {self.steps_per_epoch} steps/epoch, "
                                    f"{self.total_steps} steps)")
                for note in self._notes:
                    self.logger.note(note)
            self._train_loop()
            result = self._finish(started)
            if env.is_main:
                result.artefacts = list_artefacts(self.run_dir)
                self.logger.message(format_artefacts(self.run_dir, result.artefacts))
        except BaseException:
            if self.logger is not None:
                self.logger.close()
            if env.is_main and created and self.last_checkpoint is None and \
                    not (self.logger is not None and self.logger.history):
                _remove_engine_files(self.run_dir, created)   # nothing of value was written
            raise
        self.logger.close()
        barrier(env)
        return result

    # ------------------------------------------------------------------------------------------------
    # setup

    def _resolve_run_dir(self, run_dir, resume: bool, name_hint: str | None) -> Path:
        self._notes: list[str] = []
        if run_dir is None:
            if resume and not self.run_cfg.name:
                raise ValueError("--resume needs the run folder to continue: pass --run-dir (or set run.name)")
            name = self.run_cfg.name or f"{name_hint or self.task.app}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
            run_dir = Path(self.run_cfg.out_dir) / name
        run_dir = Path(broadcast_object(str(run_dir), self.env))

        def check() -> None:   # the folder itself is made once the run has started (see fit)
            if resume:
                if not run_dir.is_dir():
                    raise CheckpointError(f"cannot resume: run folder {run_dir} does not exist")
            elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
                raise ValueError(f"run folder {run_dir} already holds checkpoints; pass --resume to continue it, "
                                 "or choose another --run-dir")
            elif run_dir.exists() and not run_dir.is_dir():
                raise ValueError(f"run folder {run_dir} is a file; choose another --run-dir")

        _on_main(check, self.env)
        return run_dir

    def _check_datasets(self, datasets: Datasets) -> Datasets:
        if not isinstance(datasets, Datasets):
            raise TypeError(f"{type(self.task).__name__}.build_datasets() must return engine.task.Datasets, "
                            f"got {type(datasets).__name__}")
        for split in ("train", "val", "test"):
            dataset = getattr(datasets, split)
            if dataset is None:
                continue
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise TypeError(f"the {split} dataset ({type(dataset).__name__}) must be map-style "
                                "(__len__ and __getitem__)")
            if len(dataset) == 0:
                raise ValueError(f"{type(self.task).__name__}.build_datasets(): the {split} dataset is empty "
                                 "(use None for a split you do not have)")
        if datasets.train is None or len(datasets.train) == 0:
            raise ValueError(f"{type(self.task).__name__}.build_datasets() gave no training samples")
        if self.train_cfg.early_stopping.patience is not None and datasets.val is None:
            raise ValueError("train.early_stopping.patience is set, but the task has no validation split")
        return datasets

    def _check_batches(self) -> None:
        cfg, env = self.train_cfg, self.env
        n = self.epoch_len
        if self.batches_per_epoch == 0:
            raise ValueError(f"the training epoch has {n} samples, fewer than one batch of train.batch_size="
                             f"{cfg.batch_size} (with train.drop_last=true); lower the batch size")
        remainder = n % cfg.batch_size
        if not cfg.drop_last and remainder and remainder < env.world_size:
            raise ValueError(f"the last training batch has {remainder} samples, fewer than the {env.world_size} "
                             "processes; set train.drop_last=true or change train.batch_size")
        if self.task.manual_optimization and (cfg.grad_accum != 1 or env.distributed):
            raise ValueError("manual_optimization supports one process and train.grad_accum=1 only")

    def _load_pretrained(self, module: nn.Module) -> None:
        state, description = read_pretrained_weights(self.pretrained)
        report = self.task.load_pretrained(module, state)
        if isinstance(report, PretrainedReport):
            if not report.fresh:   # a task's own report may leave it out: the model keys that were not loaded
                loaded = set(report.loaded)
                report.fresh = [key for key in module.state_dict() if key not in loaded]
            report.source, report.available = description, len(state)
            self.pretrained_report = report
            self._notes.append(report.summary().replace("\n", "; "))
        else:
            self._notes.append(f"pretrained weights from {description} ({len(state)} tensors; "
                               f"{type(self.task).__name__}.load_pretrained returned no report of what it loaded)")

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids,
                                       find_unused_parameters=self.task.find_unused_parameters)

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        custom = self.task.configure_optimizers(self.module)
        if custom is None:
            if self.task.manual_optimization:
                raise ValueError("manual_optimization=True: configure_optimizers() must return the optimizers")
            return [build_optimizer(self.module, self.train_cfg.optimizer)]
        optimizers = list(custom) if isinstance(custom, (list, tuple)) else [custom]
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError("configure_optimizers() must return None, an optimizer or a list of optimizers")
        if len(optimizers) > 1 and not self.task.manual_optimization:
            raise ValueError("configure_optimizers() returned several optimizers; set manual_optimization = True "
                             "and implement manual_step()")
        return optimizers

    # ------------------------------------------------------------------------------------------------
    # checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "app": self.task.app,
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "rng": all_gather_object(capture_rng_state(), self.env),
            "world_size": self.env.world_size,
            "threads": torch.get_num_threads(),
            "progress": vars(self.progress).copy(),
            "early_stopping": self.tracker.state_dict(),
            "history": list(self.logger.history),
            "config": to_dict(self.task.config),
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
        }

    def _save(self, improved: bool = False) -> None:
        state = self._state()  # every rank: the rng gather is a collective
        if self.env.is_main:
            name = checkpoint_name(self.progress.step)
            path = self.ckpt_dir / name
            digest = save_checkpoint(state, path)
            if improved:
                self.tracker.best_file = name
                write_pointer(self.ckpt_dir, "best", {"file": name, "sha256": digest,
                                                      "metric": self.tracker.config.monitor,
                                                      "value": self.tracker.best, "epoch": self.progress.epoch,
                                                      "step": self.progress.step})
            write_pointer(self.ckpt_dir, "latest", {"file": name, "sha256": digest, "step": self.progress.step,
                                                    "epoch": self.progress.epoch,
                                                    "batch_in_epoch": self.progress.batch_in_epoch})
            protect = {self.tracker.best_file} if self.tracker.best_file else set()
            prune_checkpoints(self.ckpt_dir, self.train_cfg.keep_checkpoints, protect)
        self.tracker.best_file = broadcast_object(self.tracker.best_file, self.env)
        self.last_checkpoint = self.ckpt_dir / checkpoint_name(self.progress.step)
        self._last_save_time = self.clock()

    def _resume(self) -> list[dict[str, Any]]:
        env = self.env
        path = Path(_on_main(lambda: str(find_resume_checkpoint(self.ckpt_dir)), env))
        state = load_checkpoint(path, map_location="cpu")
        load_model_state(self.module, state["model"], str(path))
        if (self.ema is None) != (state.get("ema") is None):
            raise CheckpointError(f"{path}: train.ema_decay differs from the run being resumed "
                                  f"({'no EMA' if state.get('ema') is None else 'an EMA'} in the checkpoint)")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if len(state["optimizers"]) != len(self.optimizers):
            raise CheckpointError(f"{path} holds {len(state['optimizers'])} optimizer state(s), the task builds "
                                  f"{len(self.optimizers)}")
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])
        self.progress = _Progress(**state["progress"])
        self.tracker.load_state_dict(state["early_stopping"])
        kept = restore_threads(state.get("threads"))
        if kept:
            self._notes.append(kept)
        if state["world_size"] == env.world_size:
            restore_rng_state(state["rng"][env.rank])
        else:
            seed_everything(sample_seed(self.train_cfg.seed, 2, self.progress.step, env.rank))
            self._notes.append(f"resumed with {env.world_size} processes from a run with {state['world_size']}: "
                               "data order is preserved, random streams (dropout) are reseeded")
        old, new = state.get("config"), to_dict(self.task.config)
        if old != new:
            changed = _dict_diff(old or {}, new)
            self._notes.append("config differs from the checkpoint's: " + "; ".join(changed[:10]))
        self.last_checkpoint = path
        self._notes.append(f"resumed from {path} (epoch {self.progress.epoch}, step {self.progress.step}, "
                           f"batch {self.progress.batch_in_epoch} of the epoch)")
        return list(state["history"])

    # ------------------------------------------------------------------------------------------------
    # training

    def _finished(self) -> bool:
        p, cfg = self.progress, self.train_cfg
        return p.stopped_early or p.epoch >= cfg.epochs or (cfg.max_steps is not None and p.step >= cfg.max_steps)

    def _epoch_order(self, epoch: int) -> list[int] | None:
        order = self.task.train_order(epoch, epoch_generator(self.train_cfg.seed, epoch))
        if order is None:
            return None
        order = order.tolist() if isinstance(order, torch.Tensor) else [int(i) for i in order]
        n = len(self.datasets.train)
        if not order or min(order) < 0 or max(order) >= n:
            raise ValueError(f"{type(self.task).__name__}.train_order({epoch}) must return indices in [0, {n}), "
                             f"got {len(order)} indices" + (f" from {min(order)} to {max(order)}" if order else ""))
        if epoch > 0 and len(order) != self.epoch_len:
            raise ValueError(f"{type(self.task).__name__}.train_order({epoch}) returned {len(order)} indices, "
                             f"epoch 0 had {self.epoch_len}; the epoch length must stay fixed")
        return order

    def _train_loader(self, epoch: int, start_batch: int) -> tuple[DataLoader, EpochBatchSampler]:
        cfg, env = self.train_cfg, self.env
        sampler = EpochBatchSampler(len(self.datasets.train), cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                    rank=env.rank, world_size=env.world_size, drop_last=cfg.drop_last,
                                    start_batch=start_batch, order=self._epoch_order(epoch))
        loader = DataLoader(SeededSamples(self.datasets.train, cfg.seed), batch_sampler=sampler,
                            num_workers=cfg.num_workers, collate_fn=self.datasets.collate_fn,
                            pin_memory=env.device.type == "cuda",
                            # the loader draws its worker base seed from this generator, not the global one
                            generator=torch.Generator().manual_seed(sample_seed(cfg.seed, epoch, 3)))
        return loader, sampler

    def _checkpoint_due(self) -> bool:
        cfg = self.train_cfg
        if cfg.checkpoint_every_steps and self.progress.step % cfg.checkpoint_every_steps == 0:
            return True
        if cfg.checkpoint_every_minutes is None:
            return False
        due = self.clock() - self._last_save_time >= 60.0 * cfg.checkpoint_every_minutes
        # Saving is collective (the rng gather): every rank must take rank 0's decision.
        return bool(broadcast_object(due, self.env)) if self.env.distributed else due

    def _train_loop(self) -> None:
        cfg, env, p = self.train_cfg, self.env, self.progress
        self._last_save_time = self.clock()
        self.logger.start_progress(self.total_steps, initial=min(p.step, self.total_steps))
        self._window = _LogWindow(env.device)
        while not self._finished():
            loader, sampler = self._train_loader(p.epoch, p.batch_in_epoch)
            stop_now = False
            self.model.train()
            offset = -1
            for offset, batch in enumerate(loader):
                index = sampler.start_batch + offset                   # global micro-batch index in the epoch
                window = index // cfg.grad_accum
                window_len = min(cfg.grad_accum, self.batches_per_epoch - window * cfg.grad_accum)
                last_micro = (index + 1) % cfg.grad_accum == 0 or index == self.batches_per_epoch - 1
                global_n = sampler.global_batch_size(index)
                local_n = split_sizes(global_n, env.world_size)[env.rank]
                scale = env.world_size * local_n / global_n / window_len
                batch = move_to_device(batch, env.device, non_blocking=env.device.type == "cuda")
                if self.task.manual_optimization:
                    self._manual_micro_step(batch, scale, global_n)
                else:
                    self._micro_step(batch, scale, last_micro, global_n)
                if not last_micro:
                    continue
                p.batch_in_epoch = index + 1
                self._after_update()
                epoch_end = index == self.batches_per_epoch - 1
                max_reached = cfg.max_steps is not None and p.step >= cfg.max_steps
                if not epoch_end and not max_reached and self._checkpoint_due():
                    self._save()   # mid-epoch; the epoch end and the max_steps end save anyway
                if max_reached:
                    stop_now = True
                    break
            if offset < 0 and p.batch_in_epoch < self.batches_per_epoch:
                # would loop forever: the sampler's epoch is shorter than the one the step counts assume
                raise RuntimeError(f"the training loader of epoch {p.epoch} yielded no batch from micro-batch "
                                   f"{p.batch_in_epoch} on, but the epoch has {self.batches_per_epoch}")
            if p.batch_in_epoch >= self.batches_per_epoch:
                p.epoch += 1
                p.batch_in_epoch = 0
                due = p.epoch % cfg.eval_every_epochs == 0 or p.epoch >= cfg.epochs
            else:
                due = stop_now   # max_steps ended the run mid-epoch: evaluate what we have
            self._end_of_period(evaluate_now=due or stop_now)

    def _micro_step(self, batch: Any, scale: float, last_micro: bool, global_n: int) -> None:
        sync = contextlib.nullcontext() if last_micro or not self.env.distributed else self.model.no_sync()
        with sync:
            with _autocast(self.train_cfg.precision, self.env.device):
                output = self.task.training_step(self.model, batch)
            loss, extras = _split_loss(output, type(self.task).__name__)
            self.scaler.scale(loss * scale).backward()
        self._window.add(loss.detach(), extras, global_n)
        if last_micro:
            optimizer = self.optimizers[0]
            self._clip_and_step(optimizer)
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)

    def _manual_micro_step(self, batch: Any, scale: float, global_n: int) -> None:
        context = _EngineStepContext(self, scale)
        with _autocast(self.train_cfg.precision, self.env.device):
            logs = self.task.manual_step(self.model, batch, self.optimizers, context)
        logs = dict(logs or {})
        loss = logs.pop("loss", float("nan"))
        self._window.add(torch.as_tensor(float(loss)), logs, global_n)
        self.scaler.update()

    def _clip_and_step(self, optimizer: torch.optim.Optimizer) -> None:
        clip = self.train_cfg.clip_grad_norm
        if clip is not None:
            self.scaler.unscale_(optimizer)
            params = [q for group in optimizer.param_groups for q in group["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            self._window.grad_norm(norm.detach())
        self.scaler.step(optimizer)

    def _after_update(self) -> None:
        p, cfg = self.progress, self.train_cfg
        lr = self.optimizers[0].param_groups[0]["lr"]   # the lr this update used
        for scheduler in self.schedulers:
            scheduler.step()
        if self.ema is not None:
            self.ema.update(self.module)
        p.step += 1
        logged = None
        if p.step % cfg.log_every_steps == 0 or p.step == self.total_steps:
            logged = self._window.flush(self.env)
            if not math.isfinite(logged["train/loss"]):
                raise NonFiniteLossError(f"training loss is {logged['train/loss']} at step {p.step} (epoch "
                                         f"{p.epoch}); lower train.optimizer.lr, set train.clip_grad_norm, or use "
                                         "train.precision=fp32")
            row = {"step": p.step, "epoch": round(p.step / self.steps_per_epoch, 4), **logged, "lr": lr}
            self.logger.log(row)
        postfix = {"epoch": p.epoch + 1}
        if logged:
            postfix.update({"loss": logged["train/loss"], "samples/s": logged["train/samples_per_s"]})
        self.logger.advance(postfix if logged else None)

    def _end_of_period(self, evaluate_now: bool) -> None:
        p, env = self.progress, self.env
        improved = stop = False
        if evaluate_now and self.datasets.val is not None:
            metrics = self._evaluate_all("val")
            self.logger.log({"step": p.step, "epoch": p.epoch, **metrics})
            self.logger.message(f"epoch {p.epoch} step {p.step}: {format_metrics(metrics)}")
            improved, stop = self.tracker.update(metrics, p.epoch, p.step)
            if stop:
                p.stopped_early = True
                self.logger.message(f"early stopping: {self.tracker.config.monitor} did not improve for "
                                    f"{self.tracker.bad_evals} evaluations (best {self.tracker.best:.6g} at epoch "
                                    f"{self.tracker.best_epoch})")
        self._save(improved=improved)
        self.logger.write_csv()

    # ------------------------------------------------------------------------------------------------
    # evaluation

    def _evaluate_all(self, split: str) -> dict[str, float]:
        dataset = getattr(self.datasets, split)
        metrics = _evaluate_module(self.task, self.module, dataset, split, self.env, self._eval_batch_size(),
                                   self.train_cfg, self.datasets.collate_fn, prefix=split)
        if self.ema is not None:
            metrics.update(_evaluate_module(self.task, self.ema.module, dataset, split, self.env,
                                            self._eval_batch_size(), self.train_cfg, self.datasets.collate_fn,
                                            prefix=f"{split}_ema"))
        return metrics

    def _eval_batch_size(self) -> int:
        return self.train_cfg.eval_batch_size or self.train_cfg.batch_size

    def _finish(self, started: float) -> FitResult:
        env, p = self.env, self.progress
        es = self.train_cfg.early_stopping
        history = self.logger.history
        best_path = self.ckpt_dir / self.tracker.best_file if self.tracker.best_file else None
        restored = False
        if es.restore_best and best_path is not None and best_path != self.last_checkpoint:
            state = load_checkpoint(best_path)
            load_model_state(self.module, state["model"], str(best_path))
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            restored = True
        weights_step = self.tracker.best_step if restored else p.step
        metrics = _last_eval_row(history, weights_step, "val")
        if self.datasets.test is not None:
            test = self._evaluate_all("test")
            metrics.update(test)
            self.logger.log({"step": p.step, "epoch": p.epoch, "weights_step": weights_step, **test})
            self.logger.message(f"test ({'best' if restored else 'final'} weights, step {weights_step}): "
                                f"{format_metrics(test)}")
        wall = time.time() - started
        tracked = self.tracker.best is not None
        result = FitResult(run_dir=self.run_dir, metrics=metrics, best_metric=es.monitor if tracked else None,
                           best_value=self.tracker.best, best_epoch=self.tracker.best_epoch,
                           best_checkpoint=best_path, last_checkpoint=self.last_checkpoint, epochs=p.epoch,
                           steps=p.step, stopped_early=p.stopped_early, wall_time_s=wall, history=list(history))
        if env.is_main:
            self.logger.write_csv()
            curves = plot_curves(history, self.run_dir / "curves.png", title=f"{self.task.app}: {self.run_dir.name}") \
                if self.run_cfg.curves else None
            summary = {
                "app": self.task.app, "run_dir": str(self.run_dir), "metrics": metrics,
                "weights": "best" if restored else "final", "weights_step": weights_step,
                "best": {"metric": result.best_metric, "value": result.best_value, "epoch": result.best_epoch,
                         "checkpoint": str(best_path) if best_path else None},
                "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "epochs": p.epoch, "steps": p.step, "stopped_early": p.stopped_early,
                "wall_time_s": round(wall, 3), "world_size": env.world_size, "device": str(env.device),
                "threads": torch.get_num_threads(),
                "precision": self.train_cfg.precision, "curves": str(curves) if curves else None,
                "notes": self.logger.notes,
            }
            (self.run_dir / "summary.json").write_text(json.dumps(_finite(summary), indent=1, default=str) + "\n")
            self.task.on_fit_end(self.module, self.run_dir)
        return result


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created, outermost first."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


# What the engine itself writes into a run folder before the first checkpoint or logged row.
_ENGINE_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json")


def _remove_engine_files(run_dir: Path, created: list[Path]) -> None:
    """After a start that failed: delete the engine's own files from the run folder and the folders this run
    created, if they are then empty. Anything else (a file the user put there) keeps its folder."""
    for name in _ENGINE_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in ("tensorboard", "checkpoints"):
        sub = run_dir / name
        if sub.is_dir():
            for path in sub.iterdir():
                if path.is_file() and (path.name.startswith("events.out.tfevents.") or ".tmp-" in path.name):
                    path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                sub.rmdir()
    for folder in reversed(created):   # innermost first; rmdir refuses a folder that is not empty
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _on_main(fn: Callable[[], Any], env: DistEnv) -> Any:
    """Run `fn` on rank 0 and give its result to every rank; an exception there is raised on every rank
    (so no rank waits forever in the next collective)."""
    result = error = None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    if not env.distributed:
        if error is not None:
            raise error
        return result
    shared = (result, None if error is None else (type(error), str(error)))
    result, failure = broadcast_object(shared, env)
    if error is not None:
        raise error
    if failure is not None:
        kind, message = failure
        try:
            raise kind(message)
        except TypeError:
            raise RuntimeError(f"rank 0 failed: {kind.__name__}: {message}") from None
    return result


class _LogWindow:
    """Sums of losses and extras since the last logged step (tensors, so no device sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        self.samples = 0
        self.extras: dict[str, float] = {}
        self.norms: list[torch.Tensor] = []
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, extras: Mapping[str, float], global_samples: int) -> None:
        self.loss += loss.to(self.device, torch.float64)
        self.count += 1
        self.samples += global_samples
        for key, value in extras.items():
            self.extras[key] = self.extras.get(key, 0.0) + float(value)

    def grad_norm(self, norm: torch.Tensor) -> None:
        self.norms.append(norm)

    def flush(self, env: DistEnv) -> dict[str, float]:
        keys = sorted(self.extras)
        values = torch.stack([self.loss.cpu(), *[torch.tensor(self.extras[k], dtype=torch.float64) for k in keys]])
        values = all_reduce_sum(values.to(env.device if env.backend == "nccl" else "cpu"), env).cpu()
        count = self.count * env.world_size
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        row = {"train/loss": float(values[0]) / max(count, 1)}
        row.update({f"train/{k}": float(v) / max(count, 1) for k, v in zip(keys, values[1:])})
        if self.norms:
            row["train/grad_norm"] = float(torch.stack([n.float().cpu() for n in self.norms]).mean())
        row["train/samples_per_s"] = round(self.samples / elapsed, 2)
        self.reset()
        return row


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _split_loss(output: Any, task_name: str) -> tuple[torch.Tensor, dict[str, float]]:
    extras: dict[str, float] = {}
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], Mapping):
        output, extras = output
        extras = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in extras.items()}
    if not isinstance(output, torch.Tensor) or output.dim() != 0:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TypeError(f"{task_name}.training_step must return a scalar loss tensor (or (loss, dict)), got {shape}")
    if not output.requires_grad:
        raise RuntimeError(f"{task_name}.training_step returned a loss that does not require grad (computed "
                           "under no_grad, or detached?)")
    return output, extras


def _last_eval_row(history: Sequence[Mapping[str, Any]], step: int, split: str) -> dict[str, float]:
    """The `split` metrics logged at `step` (the evaluation of the weights saved at that step)."""
    for row in reversed(history):
        if row.get("step") == step and any(k.startswith(f"{split}/") for k in row):
            return {k: v for k, v in row.items() if k.startswith((f"{split}/", f"{split}_ema/"))}
    return {}


def _dict_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in list(old) + [k for k in new if k not in old]:
            changes += _dict_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return changes
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _evaluate_module(task: Task, module: nn.Module, dataset: Dataset, split: str, env: DistEnv, batch_size: int,
                     cfg: TrainConfig, collate_fn: Callable | None, prefix: str) -> dict[str, float]:
    """Evaluate `module` on this rank's shard of `dataset`, gather all outputs, compute metrics on rank 0
    and share them, so every rank returns the same dict."""
    per_rank = max(1, -(-batch_size // env.world_size))
    sampler = ShardSampler(len(dataset), env.rank, env.world_size)
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate_fn, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    was_training = module.training
    module.eval()
    outputs = []
    name = type(task).__name__
    try:
        with torch.no_grad():
            for batch in loader:
                batch = move_to_device(batch, env.device)
                with _autocast(cfg.precision, env.device):
                    out = task.eval_step(module, batch)
                if not isinstance(out, Mapping):
                    raise TypeError(f"{name}.eval_step must return a dict of per-sample tensors, got "
                                    f"{type(out).__name__}")
                outputs.append({k: _to_cpu_full_precision(v) for k, v in out.items()})
    finally:
        module.train(was_training)
    gathered = gather_outputs(outputs, env, where=f"{name}.eval_step ({split})")
    metrics = None
    if env.is_main:
        raw = task.compute_metrics(gathered, split)
        if not isinstance(raw, Mapping):
            raise TypeError(f"{name}.compute_metrics must return a dict of floats, got {type(raw).__name__}")
        metrics = {}
        for key, value in raw.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name}.compute_metrics({split!r}) returned {key}={value!r}; metrics must be numbers")
            metrics[f"{prefix}/{key}"] = float(value)
    return broadcast_object(metrics, env)


def _to_cpu_full_precision(value: Any) -> Any:
    """Eval outputs go to the CPU; bf16/fp16 ones (autocast) are widened to float32 -- lossless -- so that
    metrics summed over a whole split do not accumulate in 8 bits of mantissa."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value


def evaluate(task: Task, model_or_checkpoint: nn.Module | str | Path, split: str = "test", *,
             use_ema: bool = False, batch_size: int | None = None) -> dict[str, float]:
    """Metrics of a model (or of the weights in a checkpoint / run folder, built with `task.build_model`)
    on one split of `task.build_datasets()`. Works in one process and under torchrun."""
    cfg: TrainConfig = getattr(task.config, "train", None) or TrainConfig()
    env = init_distributed(cfg.device)
    _check_precision(cfg.precision, env.device)
    if isinstance(model_or_checkpoint, nn.Module):
        module = model_or_checkpoint
    else:
        path = resolve_checkpoint(model_or_checkpoint, prefer="best")
        state = load_checkpoint(path)
        seed_everything(cfg.seed)
        module = task.build_model()
        key = "ema" if use_ema else "model"
        if state.get(key) is None:
            raise CheckpointError(f"{path} holds no EMA weights (the run had train.ema_decay unset)")
        load_model_state(module, state[key], str(path))
    datasets = task.build_datasets()
    dataset = getattr(datasets, split, None) if split in ("train", "val", "test") else None
    if dataset is None:
        raise ValueError(f"split {split!r}: the task has no such dataset (expected one of train, val, test that "
                         "build_datasets() provides)")
    module = module.to(env.device)
    return _evaluate_module(task, module, dataset, split, env, batch_size or cfg.eval_batch_size or cfg.batch_size,
                            cfg, datasets.collate_fn, prefix=split + ("_ema" if use_ema else ""))
