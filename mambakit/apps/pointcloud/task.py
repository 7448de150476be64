"""The engine hooks of point-cloud classification and part segmentation: model, datasets, loss, metrics, and
the confusion matrix, class list and renders written at the end of a run."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.engine.task import Datasets, PretrainedReport, Task, load_matching

from .config import PointCloudRecipe
from .losses import poly1_focal_loss
from .metrics import (classification_metrics, confusion_matrix, part_segmentation_metrics, per_class_accuracy,
                      restricted_predictions)

__all__ = ["PointCloudTask", "LABELS_FILE", "MODEL_TITLES", "forward_batch"]

#: written into every run folder: the class (or category / part) names the model's outputs mean
LABELS_FILE = "labels.json"
MODEL_TITLES = {"pcm": "PCM", "pcm_tiny": "PCM-Tiny", "pointnet2_ssg": "PointNet++ (SSG)",
                "point_transformer": "Point Transformer", "dgcnn": "DGCNN"}


def forward_batch(model: nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """The model's logits for a collated batch: (B, classes) or, for part segmentation, (B, N, parts)."""
    if task == "seg":
        return model(batch["pos"], batch["x"], batch["category"])
    return model(batch["pos"], batch["x"])


class PointCloudTask(Task):
    """Classification (batches: pos, x, y (B,)) or part segmentation (pos, x, y (B, N), category (B,)).

    load_pretrained: load `model.pretrained` when building the model (False when a checkpoint's weights
    replace them anyway, as in `eval` and `predict`)."""

    app = "pointcloud"

    def __init__(self, config: PointCloudRecipe, load_pretrained: bool = True):
        super().__init__(config)
        self.load_pretrained_weights = load_pretrained
        self._splits = None
        self.confusion: dict[str, torch.Tensor] = {}
        self.pretrained_report: PretrainedReport | None = None

    @property
    def kind(self) -> str:
        return self.config.model.task

    @property
    def splits(self):
        if self._splits is None:
            from .splits import build_splits

            self._splits = build_splits(self.config.data, self.config.augment.resolve())
            # the saved recipe names the classes, so a checkpoint alone says what its outputs mean
            self.config.data.class_names = list(self._splits.classes)
        return self._splits

    @property
    def labels(self) -> dict:
        """What the outputs mean: classes, or categories and the parts of each."""
        s = self.splits
        if self.kind == "seg":
            return {"task": "seg", "categories": list(s.categories), "parts_of_category": s.parts_of_category,
                    "part_names": list(s.part_names)}
        return {"task": "cls", "classes": list(s.classes)}

    # -- engine hooks ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from .models import create_model

        c = self.config
        s = self.splits
        if self.kind == "seg":
            model = create_model(c.model.name, len(s.part_names), in_channels=c.data.in_channels, task="seg",
                                 n_categories=len(s.categories), **c.model.kwargs)
        else:
            model = create_model(c.model.name, len(s.classes), in_channels=c.data.in_channels, **c.model.kwargs)
        if c.model.pretrained and self.load_pretrained_weights:
            from .convert import read_pretrained

            self.pretrained_report = self.load_pretrained(model, read_pretrained(c.model.pretrained))
            self.pretrained_report.source = str(c.model.pretrained)
            print(self.pretrained_report.summary())
        return model

    def load_pretrained(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> PretrainedReport:
        # a different class count replaces the head: its tensors have another shape and are left fresh
        return load_matching(model, state_dict)

    def build_datasets(self) -> Datasets:
        from .data import collate_points

        s = self.splits
        return Datasets(train=s.train, val=s.val, test=s.test,
                        collate_fn=partial(collate_points, features=self.config.data.features))

    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = forward_batch(model, batch, self.kind).float()
        logits, target = logits.reshape(-1, logits.shape[-1]), batch["y"].reshape(-1)
        if self.config.model.loss == "poly1_focal":
            return poly1_focal_loss(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.config.augment.resolve().smoothing)

    def eval_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        logits = forward_batch(model, batch, self.kind).float()
        if self.kind == "seg":
            # per point only the part among its shape category's parts (ShapeNetPart's protocol); keeping the
            # (B, N, parts) logits of a whole split would take gigabytes on ShapeNetPart
            pred = restricted_predictions(logits, batch["category"], self.splits.parts_of_category)
            return {"pred": pred, "target": batch["y"], "category": batch["category"]}
        return {"logits": logits, "target": batch["y"]}

    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        if self.kind == "seg":
            return part_segmentation_metrics(outputs["pred"], outputs["target"], outputs["category"],
                                             self.splits.parts_of_category, self.splits.categories)
        logits, target = outputs["logits"], outputs["target"]
        cm = confusion_matrix(logits.argmax(1), target, logits.shape[1])
        self.confusion[split] = cm
        metrics = classification_metrics(logits, target)
        for name, acc in zip(self.splits.classes, per_class_accuracy(cm).tolist()):
            if acc == acc:                                   # NaN: the class is absent from this split
                metrics[f"acc/{name}"] = acc
        return metrics

    def on_fit_end(self, model: nn.Module, run_dir) -> None:
        run_dir = Path(run_dir)
        (run_dir / LABELS_FILE).write_text(json.dumps(self.labels, indent=1) + "\n")
        if self.kind == "cls" and self.config.eval.confusion_matrix:
            for split in ("test", "val"):
                if split in self.confusion:
                    self.write_confusion(split, run_dir / f"confusion_{split}.png")
                    break

    def write_confusion(self, split: str, path: Path) -> Path:
        from .plots import plot_confusion_matrix

        title = f"{MODEL_TITLES.get(self.config.model.name, self.config.model.name)}, {split} split"
        return plot_confusion_matrix(self.confusion[split].numpy(), list(self.splits.classes), path, title=title)
