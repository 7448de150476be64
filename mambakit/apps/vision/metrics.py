"""Classification metrics on the logits of a whole split: loss, top-1 / top-k accuracy, confusion matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["topk_accuracy", "confusion_matrix", "classification_metrics"]


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose target is among the k highest logits. logits (N, C), target (N,)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"topk_accuracy: logits {tuple(logits.shape)} and target {tuple(target.shape)} do not "
                         f"match (expected (N, C) and (N,))")
    if not len(target):
        return float("nan")
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().mean().item()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows the true class, columns the prediction."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, topk: int = 5) -> dict[str, float]:
    """loss (cross-entropy), acc (top-1), acc_top{k} when there are more than k classes, balanced_acc
    (mean recall over the classes present)."""
    logits, target = logits.float(), target.long()
    out = {"loss": F.cross_entropy(logits, target).item(), "acc": topk_accuracy(logits, target, 1)}
    if logits.shape[1] > topk > 1:
        out[f"acc_top{topk}"] = topk_accuracy(logits, target, topk)
    cm = confusion_matrix(logits.argmax(1), target, logits.shape[1]).double()
    present = cm.sum(1) > 0
    out["balanced_acc"] = (cm.diag()[present] / cm.sum(1)[present]).mean().item()
    return out
