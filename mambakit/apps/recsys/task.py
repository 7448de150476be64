"""The engine hooks for sequential recommendation: one protocol for every model.

Training: every prefix of a user's training interactions predicts its next item, cross-entropy over all
items (RecBole `loss_type: CE`). Evaluation: the validation / test item of each user is ranked against all
items; per example the task returns the target's rank (and the popularity baseline's), so the metrics are
exact when several processes evaluate.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mambakit.engine.task import Datasets, PretrainedReport, Task, load_matching

from .config import RecsysData, RecsysRecipe
from .data import (ExampleDataset, LOOSplit, SequenceCollator, SequenceData, Vocabulary, interaction_counts,
                   leave_one_out, load_sequence_data)
from .metrics import mask_history_, ranking_metrics, target_rank
from .models import VOCAB_BUFFER, attach_vocabulary, build_model, stored_vocabulary

__all__ = ["RecsysTask", "load_data", "resolve_data_path", "popularity_metrics", "describe_data", "MODEL_TITLES",
           "score_items"]

MODEL_TITLES = {"mamba4rec": "Mamba4Rec", "tim4rec": "TiM4Rec", "sasrec": "SASRec", "gru4rec": "GRU4Rec",
                "mostpop": "most popular"}


def resolve_data_path(cfg: RecsysData) -> Path:
    """The folder / zip / .inter file the recipe names: `data.path`, or the registered dataset's cache folder
    (fetched on first use)."""
    if cfg.path is not None:
        return Path(cfg.path).expanduser()
    from mambakit.data import fetch, register_dataset

    from .datasets import DATASETS

    for entry in DATASETS:          # registered here too, so no discovery of every app is needed
        register_dataset(entry)
    return fetch(cfg.dataset)


def _stamp(path: Path) -> tuple:
    """Size and modification time of the data file(s): a file rewritten in place is read again."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


@lru_cache(maxsize=4)
def _load_cached(path: str, stamp, name, user_field, item_field, time_field, user_min, item_min, title_field,
                 time_precision, tie_break, vocabulary_json) -> SequenceData:
    vocabulary = Vocabulary.from_json(vocabulary_json) if vocabulary_json is not None else None
    return load_sequence_data(path, name, user_field=user_field, item_field=item_field, time_field=time_field,
                              user_min=user_min, item_min=item_min, title_field=title_field,
                              time_precision=time_precision, tie_break=tie_break, vocabulary=vocabulary)


def load_data(cfg: RecsysData, vocabulary: Vocabulary | None = None) -> SequenceData:
    """Read, filter and sequence the recipe's data (memoised per process: train, eval and the baseline share it).
    With a trained model's `vocabulary`, the file must be its training data and the ids are its ids."""
    path = resolve_data_path(cfg)
    stamp = _stamp(path) if path.exists() else None
    return _load_cached(str(path), stamp, cfg.name, cfg.user_field, cfg.item_field, cfg.time_field,
                        cfg.user_min_interactions, cfg.item_min_interactions, cfg.title_field, cfg.time_precision,
                        cfg.tie_break, vocabulary.to_json() if vocabulary is not None else None)


def score_items(model: nn.Module, batch: dict) -> torch.Tensor:
    """(b, n_items) float32 scores of every item for a batch, padding column -inf: what evaluation ranks and
    what `recommend` ranks (one function, so the two cannot drift apart)."""
    return padding_masked(model(batch["item_seq"], batch["item_seq_len"], batch.get("time_seq"), scores=True))


def padding_masked(logits: torch.Tensor) -> torch.Tensor:
    """A float32 copy of the logits with the padding column at -inf (never ranked)."""
    scores = logits.float().clone()
    scores[:, 0] = -math.inf
    return scores


class RecsysTask(Task):
    app = "recsys"

    def __init__(self, config: RecsysRecipe, vocabulary: Vocabulary | None = None):
        """`vocabulary`: a trained model's (eval of a checkpoint): the data must be its training data."""
        super().__init__(config)
        self.vocabulary = vocabulary
        self._checked_models: set = set()
        if config.model.name == "mostpop":
            raise ValueError("model mostpop has nothing to train; `mambakit recsys train` evaluates it directly")
        # TiM4Rec's last layer computes a next time signal nobody reads (as upstream): DDP must allow it.
        self.find_unused_parameters = config.model.name == "tim4rec" and config.model.is_time
        self._data: SequenceData | None = None
        self._split: LOOSplit | None = None
        self._device_cache: dict = {}

    # ------------------------------------------------------------------------------------------------
    @property
    def data(self) -> SequenceData:
        if self._data is None:
            self._data = load_data(self.config.data, self.vocabulary)
            self._split = leave_one_out(self._data)
            if len(self._split.train) == 0:
                raise ValueError(f"{self._data.name}: no training examples (every user needs at least 2 "
                                 f"interactions after filtering)")
        return self._data

    @property
    def split(self) -> LOOSplit:
        _ = self.data
        return self._split

    def build_model(self) -> nn.Module:
        model = build_model(self.config.model, self.data.n_items, self.config.data.max_len)
        return attach_vocabulary(model, self.vocabulary or self.data.vocabulary())

    def _check_vocabulary(self, model: nn.Module) -> None:
        """Once per model: its stored vocabulary must be the one the task's ids come from (a resumed or loaded
        checkpoint of other data would otherwise score the wrong items)."""
        buffer = getattr(model, VOCAB_BUFFER, None)
        key = (id(model), None if buffer is None else buffer.data_ptr())
        if key in self._checked_models:
            return
        expected = self.vocabulary or self.data.vocabulary()
        found = stored_vocabulary(model, "the model")
        if found is None or found.item_tokens != expected.item_tokens:
            raise ValueError(f"{self.data.name}: the model's stored item vocabulary is not this data's "
                             f"({'none stored' if found is None else f'{found.n_items - 1} items'} vs "
                             f"{expected.n_items - 1}): the weights belong to other data")
        self._checked_models.add(key)

    def collator(self) -> SequenceCollator:
        traits = self.model_traits(self.config.model)
        return SequenceCollator(self.data, self.config.data.max_len, with_time=traits["uses_time"],
                                fixed_length=traits["fixed_length"])

    @staticmethod
    def model_traits(model_config) -> dict[str, bool]:
        """Whether a model reads timestamps and whether it needs exactly max_len positions."""
        if model_config.name == "tim4rec":
            return {"uses_time": bool(model_config.is_time), "fixed_length": True}
        return {"uses_time": False, "fixed_length": False}

    def build_datasets(self) -> Datasets:
        split = self.split
        if int(os.environ.get("RANK", "0")) == 0:
            print(describe_data(self.data, split), flush=True)
        return Datasets(train=ExampleDataset(split.train),
                        val=ExampleDataset(split.val) if len(split.val) else None,
                        test=ExampleDataset(split.test) if len(split.test) else None,
                        collate_fn=self.collator())

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _forward(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["item_seq"], batch["item_seq_len"], batch.get("time_seq"), scores=True)

    def training_step(self, model: nn.Module, batch: dict):
        logits = self._forward(model, batch)
        return F.cross_entropy(logits, batch["target"])

    def _on_device(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._device_cache:
            if name == "items":
                value = torch.from_numpy(self.data.items)
            else:  # popularity scores, padding column -inf
                counts = torch.from_numpy(interaction_counts(self.data, self.split))
                counts[0] = -math.inf
                value = counts
            self._device_cache[key] = value.to(device)
        return self._device_cache[key]

    def _rank(self, scores: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.config.eval.mask_history:
            mask_history_(scores, self._on_device("items", scores.device), batch["history_start"],
                          batch["target_pos"], batch["target"])
        return target_rank(scores, batch["target"], max(self.config.eval.ks))

    def eval_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        self._check_vocabulary(model)
        logits = self._forward(model, batch).float()
        out = {"loss": F.cross_entropy(logits, batch["target"], reduction="none")}
        out["rank"] = self._rank(padding_masked(logits), batch)
        if self.config.eval.popularity_baseline:
            pop = self._on_device("popularity", logits.device)
            out["pop_rank"] = self._rank(pop.expand(len(logits), -1).clone(), batch)
        return out

    def load_pretrained(self, model: nn.Module, state_dict) -> PretrainedReport:
        """Fine-tuning: the new data's vocabulary stays; item embedding rows are matched by item token when the
        weights carry their vocabulary (rows of items the weights do not know keep their fresh init), so
        another id order or a changed item set cannot give an item another item's embedding."""
        state = {k: v for k, v in state_dict.items() if k != VOCAB_BUFFER}
        old = stored_vocabulary(state_dict, "the pretrained weights")
        key = "item_embedding.weight"
        if old is None or key not in state:
            return load_matching(model, state)
        new = stored_vocabulary(model, "the model")
        rows = model.state_dict()[key].clone()
        old_ids = old.token_to_id()
        pairs = [(i + 1, old_ids[t]) for i, t in enumerate(new.item_tokens) if t in old_ids]
        if pairs:
            dst, src = (torch.tensor(c) for c in zip(*pairs))
            rows[dst] = state[key][src].to(rows.dtype)
        state[key] = rows
        report = load_matching(model, state)
        report.loaded = [k if k != key else f"{key} ({len(pairs)} of {new.n_items - 1} items matched by token)"
                         for k in report.loaded]
        return report

    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        ks = self.config.eval.ks
        metrics = ranking_metrics(outputs["rank"], ks)
        metrics["loss"] = float(outputs["loss"].double().mean())
        if "pop_rank" in outputs:
            metrics.update({f"pop_{k}": v for k, v in ranking_metrics(outputs["pop_rank"], ks).items()})
        return metrics


def popularity_metrics(config: RecsysRecipe, split: str = "test") -> dict[str, float]:
    """The most-popular baseline under the recipe's protocol: training counts rank every item."""
    data = load_data(config.data)
    loo = leave_one_out(data)
    examples = getattr(loo, split)
    if len(examples) == 0:
        raise ValueError(f"{data.name}: the {split} split is empty")
    counts = torch.from_numpy(interaction_counts(data, loo))
    counts[0] = -math.inf
    collate = SequenceCollator(data, config.data.max_len)
    batch = collate.batch(examples)
    scores = counts.expand(len(examples), -1).clone()
    if config.eval.mask_history:
        mask_history_(scores, torch.from_numpy(data.items), batch["history_start"], batch["target_pos"],
                      batch["target"])
    return ranking_metrics(target_rank(scores, batch["target"], max(config.eval.ks)), config.eval.ks)


def describe_data(data: SequenceData, split: LOOSplit) -> str:
    lengths = np.diff(data.offsets)
    return (f"{data.name}: {data.n_users} users, {data.n_items - 1} items, {data.n_interactions} interactions "
            f"(mean {lengths.mean():.1f} per user; {data.tie_share():.0%} of consecutive ones tie in time); "
            f"examples train {len(split.train)}, val {len(split.val)}, test {len(split.test)}")
