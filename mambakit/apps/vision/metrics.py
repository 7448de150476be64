"""Classification metrics on the logits of a whole split: loss, top-1 / top-k accuracy, balanced accuracy, macro
F1, confusion matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["topk_accuracy", "confusion_matrix", "macro_f1", "classification_metrics"]


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


def macro_f1(cm: torch.Tensor) -> float:
    """Mean F1 = 2 TP / (2 TP + FP + FN) over the classes that occur as a target or a prediction (the
    classes of scikit-learn's f1_score(average="macro")), from a confusion matrix (rows true, columns predicted)."""
    cm = cm.double()
    tp, true, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    seen = (true + predicted) > 0
    return (2 * tp[seen] / (true[seen] + predicted[seen])).mean().item()


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, topk: int = 5) -> dict[str, float]:
    """loss (cross-entropy), acc (top-1), acc_top{k} when there are more than k classes, balanced_acc
    (mean recall over the classes present as targets), macro_f1 (see `macro_f1`)."""
    logits, target = logits.float(), target.long()
    out = {"loss": F.cross_entropy(logits, target).item(), "acc": topk_accuracy(logits, target, 1)}
    if logits.shape[1] > topk > 1:
        out[f"acc_top{topk}"] = topk_accuracy(logits, target, topk)
    cm = confusion_matrix(logits.argmax(1), target, logits.shape[1]).double()
    present = cm.sum(1) > 0
    out["balanced_acc"] = (cm.diag()[present] / cm.sum(1)[present]).mean().item()
    out["macro_f1"] = macro_f1(cm)
    return out
