"""The engine hooks of image classification: model, datasets, loss (mixup / cutmix, label smoothing), metrics,
and the confusion matrix and class list written at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.engine.task import Datasets, Task

from .config import VisionRecipe
from .data import (IMAGENET_MEAN, IMAGENET_STD, ImageListDataset, build_datasets, build_transforms, class_names_for,
                   digit_image_to_uint8, digits_to_input, read_image)
from .metrics import classification_metrics, confusion_matrix
from .models import create_model

__all__ = ["VisionTask", "CLASSES_FILE"]

CLASSES_FILE = "classes.json"


class VisionTask(Task):
    """Image classification. Batches are (images (B, C, H, W), labels (B,)).

    load_pretrained: load `model.pretrained` when building the model (False when a checkpoint's weights
    will replace them anyway, as in `eval` and `predict`).
    """

    app = "vision"

    def __init__(self, config: VisionRecipe, load_pretrained: bool = True):
        super().__init__(config)
        self.load_pretrained_weights = load_pretrained
        self._classes: list[str] | None = None
        self._mixup = None
        self.confusion: dict[str, torch.Tensor] = {}      # split -> (C, C) counts of its last evaluation
        #: the splits whose image files build_datasets checks up front (`eval` sets the one split it reads)
        self.checked_splits: tuple[str, ...] = ("train", "val", "test")

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self._classes = class_names_for(self.config.data)
            if len(self._classes) < 2:
                raise ValueError(f"data: found {len(self._classes)} class(es); classification needs at least 2")
        return self._classes

    # -- engine hooks ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        c = self.config
        return create_model(c.model, c.data, len(self.classes), load_pretrained=self.load_pretrained_weights)

    def _model_mean_std(self):
        """The normalisation of the model's pretrained config (used where the recipe sets none)."""
        if self.config.data.source == "mnist5k":
            return None, None
        import timm
        cfg = timm.models.get_pretrained_cfg(self.config.model.name)
        return (cfg.mean, cfg.std) if cfg is not None else (None, None)

    def build_datasets(self) -> Datasets:
        c = self.config
        data = build_datasets(c.data, c.augment, *self._model_mean_std(), checked=self.checked_splits)
        if data.classes != self.classes:
            raise ValueError(f"data: the datasets hold classes {data.classes[:8]}, the model was built for "
                             f"{self.classes[:8]}")
        return Datasets(train=data.train, val=data.val, test=data.test)

    def eval_transform(self) -> Callable[[str | Path], torch.Tensor]:
        """An image file -> the tensor the evaluation loop feeds the model for it: the val / test datasets'
        own reading and transform (no augmentation). `predict` uses it, so it sees what `eval` sees."""
        data = self.config.data
        if data.source == "mnist5k":
            return lambda path: digits_to_input(digit_image_to_uint8(read_image(path, 1))[None], data)[0]
        mean, std = self._model_mean_std()
        _, evaluate = build_transforms(data, self.config.augment, data.mean or mean or IMAGENET_MEAN,
                                       data.std or std or IMAGENET_STD)
        return ImageListDataset([], evaluate, data.in_chans).load

    def _mixup_fn(self):
        aug = self.config.augment
        if self._mixup is None and aug.uses_mixup:
            from timm.data import Mixup
            self._mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                                switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                                label_smoothing=aug.smoothing, num_classes=len(self.classes))
        return self._mixup

    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        mixup = self._mixup_fn()
        if mixup is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mixup/cutmix need an even batch per process, got {images.shape[0]}; use an "
                                 f"even train.batch_size (and train.drop_last: true)")
            images, soft = mixup(images, labels)
            logits = model(images)
            return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        logits = model(images)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.config.augment.smoothing)

    def eval_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        return {"logits": model(images).float(), "target": labels}

    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        logits, target = outputs["logits"], outputs["target"]
        self.confusion[split] = confusion_matrix(logits.argmax(1), target, logits.shape[1])
        return classification_metrics(logits, target, self.config.eval.topk)

    def on_fit_end(self, model: nn.Module, run_dir) -> None:
        run_dir = Path(run_dir)
        (run_dir / CLASSES_FILE).write_text(json.dumps(self.classes) + "\n")
        if self.config.eval.confusion_matrix:
            for split in ("test", "val"):
                if split in self.confusion:
                    self.write_confusion(split, run_dir / f"confusion_{split}.png")
                    break

    def write_confusion(self, split: str, path: Path) -> Path:
        from .plots import plot_confusion_matrix
        title = f"{self.config.model.name}, {split} split"
        return plot_confusion_matrix(self.confusion[split].numpy(), self.classes, path, title=title)
