"""Training losses of the point-cloud app: label-smoothed cross-entropy (classification, PCM's
SmoothCrossEntropy) and the Poly-1 focal loss PCM trains ShapeNetPart with (openpoints `Poly1FocalLoss`:
sigmoid focal loss over one-hot targets, fvcore's form, plus epsilon (1 - p_t)^(gamma + 1), mean over every
point and class)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["poly1_focal_loss", "LOSSES"]

LOSSES = ("cross_entropy", "poly1_focal")


def poly1_focal_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float = 1.0, alpha: float = 0.25,
                     gamma: float = 2.0) -> torch.Tensor:
    """logits (M, C) with integer targets (M,); upstream's defaults (epsilon 1, alpha 0.25, gamma 2).
    alpha < 0 turns the class weighting off, as upstream."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"poly1_focal_loss: logits (M, C) and target (M,) expected, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    pt = onehot * p + (1 - onehot) * (1 - p)
    focal = ce * (1 - pt) ** gamma
    if alpha >= 0:
        focal = (alpha * onehot + (1 - alpha) * (1 - onehot)) * focal
    return (focal + epsilon * (1 - pt) ** (gamma + 1)).mean()
