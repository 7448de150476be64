"""Exponential moving average of a model's weights (timm's ModelEmaV3 update rule without warmup).

After every optimiser step, for each floating-point entry of the state dict:
    ema = decay * ema + (1 - decay) * model
Non-floating buffers (counters such as BatchNorm's num_batches_tracked) are copied. The EMA copy is an
independent module kept in eval mode on the model's device; the engine evaluates it beside the model and
logs its metrics as `val_ema/...`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model_state = model.state_dict()
        lerp_ema, lerp_model = [], []
        for name, ema_value in self.module.state_dict().items():
            value = model_state[name].detach()
            if ema_value.is_floating_point():
                lerp_ema.append(ema_value)
                lerp_model.append(value.to(dtype=ema_value.dtype))
            else:
                ema_value.copy_(value)
        if lerp_ema:
            # lerp(ema, model, 1 - decay) = ema + (1 - decay) * (model - ema) = decay * ema + (1 - decay) * model
            torch._foreach_lerp_(lerp_ema, lerp_model, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
