"""Classifier heads of timm models: where they are, and replacing them for another class count.

Every vision model here follows timm's contract: `get_classifier()`, `reset_classifier(num_classes)` and
`pretrained_cfg["classifier"]` naming the head's module (Vim: `head`, on the middle class token;
EfficientVMamba: `classifier.head`, after LayerNorm and average pooling)."""

from __future__ import annotations

from torch import nn

__all__ = ["classifier_name", "replace_head"]


def classifier_name(model: nn.Module) -> str:
    """The head's module path (timm's pretrained_cfg 'classifier', else 'head')."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") or "head"
    return name[0] if isinstance(name, (tuple, list)) else name


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised head for `num_classes` (the model's own head init); returns the model."""
    if not hasattr(model, "reset_classifier"):
        raise TypeError(f"{type(model).__name__} has no reset_classifier(); not a timm classifier")
    model.reset_classifier(num_classes)
    return model
