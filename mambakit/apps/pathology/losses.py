"""Bag losses: cross-entropy (subtyping) and MambaMIL's discrete-time NLL survival loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["nll_surv_loss", "NLLSurvLoss", "hazards_and_survival"]


def hazards_and_survival(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_bins) logits -> hazards h = sigmoid(logits) and survival S = cumprod(1 - h), as MambaMIL."""
    hazards = torch.sigmoid(logits)
    return hazards, torch.cumprod(1 - hazards, dim=1)


def nll_surv_loss(hazards: torch.Tensor, survival: torch.Tensor | None, label: torch.Tensor, censorship: torch.Tensor,
                  alpha: float = 0.0, eps: float = 1e-7) -> torch.Tensor:
    """MambaMIL's `nll_loss` (utils/survival_utils.py), batch mean.

    With S(-1) = 1 prepended: an uncensored patient in bin y contributes -log S(y-1) - log h(y); a censored
    one -log S(y). The loss is (1 - alpha) * (censored + uncensored) + alpha * uncensored; probabilities are
    clamped at `eps` before the log. hazards, survival: (B, n_bins); label (B,) int; censorship (B,) 0/1.
    """
    if hazards.dim() != 2:
        raise ValueError(f"hazards must be (batch, n_bins), got {tuple(hazards.shape)}")
    batch = hazards.shape[0]
    label = label.reshape(batch, 1).long()
    if label.min() < 0 or label.max() >= hazards.shape[1]:
        raise ValueError(f"survival bins must be in [0, {hazards.shape[1]}), got {label.flatten().tolist()}")
    c = censorship.reshape(batch, 1).to(hazards.dtype)
    if survival is None:
        survival = torch.cumprod(1 - hazards, dim=1)
    padded = torch.cat([torch.ones_like(c), survival], dim=1)
    uncensored = -(1 - c) * (torch.log(torch.gather(padded, 1, label).clamp(min=eps))
                             + torch.log(torch.gather(hazards, 1, label).clamp(min=eps)))
    censored = -c * torch.log(torch.gather(padded, 1, label + 1).clamp(min=eps))
    loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


class NLLSurvLoss:
    """Callable form with a default alpha (MambaMIL's `--alpha_surv`, default 0.0); validation uses alpha=0."""

    def __init__(self, alpha: float = 0.0):
        self.alpha = alpha

    def __call__(self, logits: torch.Tensor, label: torch.Tensor, censorship: torch.Tensor,
                 alpha: float | None = None) -> torch.Tensor:
        hazards, survival = hazards_and_survival(logits)
        return nll_surv_loss(hazards, survival, label, censorship, self.alpha if alpha is None else alpha)


def cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, label.reshape(-1).long())
