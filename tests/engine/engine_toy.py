"""A tiny regression task for the engine tests: an MLP with a LayerNorm and dropout on fixed random data.

Run as a script (also under torchrun) to train it in a fresh process:

    python tests/engine/engine_toy.py RUN_DIR [--resume] [key.sub=value ...]

MAMBAKIT_TEST_KILL_AT_CALL=k makes the process SIGKILL itself at the k-th call of training_step (1-based),
to test resuming after a hard crash. MAMBAKIT_TEST_SECONDS_PER_CALL=s gives rank 0 a clock that moves s seconds
per training_step call (the other ranks' clocks stand still: rank 0 alone decides time-triggered checkpoints).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from mambakit.engine.config import load_config
from mambakit.engine.schema import RunConfig, TrainConfig
from mambakit.engine.task import Datasets, Task


@dataclass
class ToyData:
    n_train: int = 48
    n_val: int = 20
    n_test: int = 14
    features: int = 5
    noise: float = 0.1
    augment: float = 0.0          # std of noise added to x on every read (randomness in data loading)
    seed: int = 123


@dataclass
class ToyModel:
    hidden: int = 16
    dropout: float = 0.0


@dataclass
class ToyRecipe:
    data: ToyData = field(default_factory=ToyData)
    model: ToyModel = field(default_factory=ToyModel)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(progress=False))


class Regression(Dataset):
    """y = x . w + noise, the same for every process (own generator)."""

    def __init__(self, n: int, features: int, noise: float, seed: int, augment: float = 0.0):
        self.augment = augment
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(features, generator=torch.Generator().manual_seed(7))
        self.x = torch.randn(n, features, generator=g)
        self.y = self.x @ w + noise * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + self.augment * torch.randn(self.x.shape[1]) if self.augment else self.x[i]
        return x, self.y[i], torch.tensor(i)


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int, dropout: float):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)
        self.scale = nn.Parameter(torch.ones(hidden, 2))
        self.scale._no_weight_decay = True

    def forward(self, x):
        h = self.drop(torch.nn.functional.gelu(self.norm(self.inp(x)))) * self.scale[:, 0]
        return self.out(h).squeeze(-1)


class ToyTask(Task):
    app = "toy"

    def __init__(self, config: ToyRecipe):
        super().__init__(config)
        self.calls = 0
        self.kill_at = int(os.environ.get("MAMBAKIT_TEST_KILL_AT_CALL", "0"))
        self.fit_end_calls = 0

    def build_model(self):
        m = self.config.model
        return MLP(self.config.data.features, m.hidden, m.dropout)

    def build_datasets(self):
        d = self.config.data
        return Datasets(train=Regression(d.n_train, d.features, d.noise, d.seed, d.augment),
                        val=Regression(d.n_val, d.features, d.noise, d.seed + 1) if d.n_val else None,
                        test=Regression(d.n_test, d.features, d.noise, d.seed + 2) if d.n_test else None)

    def training_step(self, model, batch):
        self.calls += 1
        if self.kill_at and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y, _ = batch
        pred = model(x)
        loss = torch.nn.functional.mse_loss(pred, y)
        return loss, {"mae": float((pred - y).abs().mean().detach())}

    def eval_step(self, model, batch):
        x, y, index = batch
        pred = model(x)
        return {"se": (pred - y) ** 2, "index": index}

    def compute_metrics(self, outputs, split):
        se = outputs["se"]
        return {"loss": float(se.mean()), "n": float(len(se)),
                "order_ok": float(torch.equal(outputs["index"], torch.arange(len(se))))}

    def on_fit_end(self, model, run_dir):
        self.fit_end_calls += 1
        Path(run_dir, "fit_end.txt").write_text("called\n")


def main(argv: list[str]) -> None:
    from mambakit.engine.trainer import Trainer
    resume = "--resume" in argv
    args = [a for a in argv if a != "--resume"]
    run_dir, overrides = args[0], args[1:]
    config = load_config(ToyRecipe, None, overrides)
    task = ToyTask(config)
    seconds = float(os.environ.get("MAMBAKIT_TEST_SECONDS_PER_CALL", "0"))
    rank0 = int(os.environ.get("RANK", 0)) == 0
    clock = (lambda: seconds * task.calls if rank0 else 0.0) if seconds else None
    result = Trainer(task, **({"clock": clock} if clock else {})).fit(run_dir, resume=resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"steps": result.steps, "epochs": result.epochs, "metrics": result.metrics}))


if __name__ == "__main__":
    main(sys.argv[1:])
