"""Pieces of the MIL heads shared by the models: the attention MLPs (built as the bare nn.Sequential that
MambaMIL and ABMIL hold under their own attribute names, so upstream state dicts map by key), attention
pooling, the bag-level outputs and MambaMIL's weight initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attention_mlp", "gated_attention_mlps", "attention_pool", "xavier_init", "activation"]


def activation(name: str) -> nn.Module:
    name = name.lower()
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"act must be 'relu' or 'gelu', got {name!r}")


def attention_mlp(dim: int, hidden: int = 128) -> nn.Sequential:
    """Ilse et al.'s attention scores: Linear(dim, 128) -> Tanh -> Linear(128, 1) (keys `.0`, `.2`)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def gated_attention_mlps(dim: int, hidden: int = 128) -> tuple[nn.Sequential, nn.Sequential, nn.Linear]:
    """Gated attention's V (tanh), U (sigmoid) branches and the weights layer (ABMIL's GatedAttention)."""
    return (nn.Sequential(nn.Linear(dim, hidden), nn.Tanh()), nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid()),
            nn.Linear(hidden, 1))


def attention_pool(h: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, N, D), scores (B, N) before the softmax -> (pooled (B, D), attention (B, N) summing to 1)."""
    a = F.softmax(scores, dim=-1)
    return torch.bmm(a.unsqueeze(1), h).squeeze(1), a


def xavier_init(module: nn.Module) -> None:
    """MambaMIL's `initialize_weights`: Xavier-normal Linear weights, zero Linear biases, LayerNorm (1, 0),
    on every submodule, the Mamba mixers' Linear layers included (so their dt_proj bias becomes 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
