"""Slide-level metrics: subtyping (AUC, accuracy, balanced accuracy, macro F1) and survival (C-index).

AUC follows MambaMIL's `summary()`: binary -> ROC AUC of the positive class's probability; multi-class ->
the mean of one-vs-rest AUCs over the classes present in the labels. The C-index is Harrell's, computed as
scikit-survival's `concordance_index_censored` does (the function MambaMIL calls), including its handling of
ties: a pair is comparable when the earlier time is an event, or when times are equal and only the other one
is censored; risks within `tied_tol` count one half.
"""

from __future__ import annotations

import numpy as np

__all__ = ["classification_metrics", "multiclass_auc", "concordance_index_censored", "survival_risk"]


def multiclass_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """MambaMIL's AUC (see the module docstring); nan when undefined (a single class in `labels`)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (n, n_classes) with n = len(labels) = {len(labels)}, got {probs.shape}")
    if len(np.unique(labels)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    aucs = []
    for c in range(probs.shape[1]):
        if c in labels:
            positive = labels == c
            aucs.append(roc_auc_score(positive, probs[:, c]) if 0 < positive.sum() < len(labels) else np.nan)
    return float(np.nanmean(aucs)) if aucs else float("nan")


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    preds = probs.argmax(axis=1)
    classes = np.arange(probs.shape[1])
    return {
        "auc": multiclass_auc(labels, probs),
        "acc": float((preds == labels).mean()),
        "balanced_acc": float(balanced_accuracy_score(labels, preds)) if len(np.unique(labels)) > 1
        else float((preds == labels).mean()),
        "f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
    }


def concordance_index_censored(event_indicator, event_time, estimate, tied_tol: float = 1e-8) -> float:
    """Harrell's C-index of risk `estimate` (higher = earlier event); nan when no pair is comparable.

    event_indicator: bool (n,) True where the event was observed (MambaMIL: 1 - censorship).
    """
    event = np.asarray(event_indicator).astype(bool).ravel()
    time = np.asarray(event_time, dtype=np.float64).ravel()
    risk = np.asarray(estimate, dtype=np.float64).ravel()
    if not len(event) == len(time) == len(risk):
        raise ValueError(f"event_indicator, event_time and estimate must have one length, got "
                         f"{len(event)}, {len(time)}, {len(risk)}")
    if not np.isfinite(time).all() or not np.isfinite(risk).all():
        raise ValueError("event_time and estimate must be finite")
    numerator = 0.0
    denominator = 0
    for i in np.flatnonzero(event):
        comparable = (time > time[i]) | ((time == time[i]) & ~event)
        if not comparable.any():
            continue
        others = risk[comparable]
        ties = np.abs(others - risk[i]) <= tied_tol
        numerator += float(((others < risk[i]) & ~ties).sum()) + 0.5 * float(ties.sum())
        denominator += int(comparable.sum())
    return numerator / denominator if denominator else float("nan")


def survival_risk(hazards_logits) -> "torch.Tensor":  # noqa: F821
    """MambaMIL's risk: -sum_t S(t), with S = cumprod(1 - sigmoid(logits)). Input (B, n_bins) -> (B,)."""
    import torch

    hazards = torch.sigmoid(hazards_logits)
    survival = torch.cumprod(1 - hazards, dim=1)
    return -survival.sum(dim=1)
