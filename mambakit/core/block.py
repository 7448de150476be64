"""`Block` (add -> norm -> mixer), `MixerModel` (the backbone: optional embedding, blocks, final norm) and
`init_weights` (mamba_ssm's `_init_weights`), with `mamba_ssm`'s names: `layers.{i}.norm.weight`,
`layers.{i}.mixer.*`, `layers.{i}.norm2` / `layers.{i}.mlp.fc1|fc2` with an MLP, `norm_f.weight`,
`embedding.weight`.

The residual stream: each block receives (hidden, residual), forms residual = residual + drop_path(hidden)
(hidden alone in the first block), normalises it and runs the mixer; the backbone's final step adds the last
mixer output to the residual and applies `norm_f`. `residual_in_fp32` keeps that running sum in float32
(an upcast of fp16/bf16 streams only; a float64 model keeps float64).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.core.cache import InferenceParams
from mambakit.core.mamba import Mamba
from mambakit.core.mamba2 import Mamba2
from mambakit.core.multi_order import MultiOrderMamba, PerOrderMamba
from mambakit.core.norm import RMSNorm
from mambakit.core.recompute import output_recomputed

__all__ = ["Block", "MixerModel", "GatedMLP", "DropPath", "init_weights", "create_block", "MIXERS",
           "drop_path_schedule"]

# ssm_cfg["layer"] -> mixer class (mamba_ssm's names, plus mambakit's multi-order mixers).
MIXERS: dict[str, type[nn.Module]] = {
    "Mamba1": Mamba, "Mamba2": Mamba2, "MultiOrder": MultiOrderMamba, "PerOrder": PerOrderMamba,
}


class DropPath(nn.Module):
    """Stochastic depth per sample: zero a sample's branch with probability p in training, scale by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GatedMLP(nn.Module):
    """mamba_ssm's GatedMLP: fc1 (d -> 2 hidden), y * silu(gate), fc2; hidden rounded up to multiple_of."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 activation: Callable = F.silu, bias: bool = False, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * self.activation(gate))


class Block(nn.Module):
    """Add -> norm -> mixer [-> add -> norm2 -> mlp]. forward(hidden, residual=None, ...) -> (hidden, residual).

    mixer_cls(dim) and mlp_cls(dim) build the sublayers (mlp_cls None or nn.Identity: no MLP); norm_cls(dim)
    the norms (default RMSNorm(eps=1e-5)). drop_path is applied to the incoming hidden before it joins the
    residual (Vim). `fused_add_norm` is accepted for config compatibility (the unfused path is the same maths).
    Extra keyword arguments of forward (lengths, hw, coords, order_indices, ...) go to the mixer; None values
    are dropped, so mixers that do not take them still work.
    """

    def __init__(self, dim: int, mixer_cls: Callable[[int], nn.Module], mlp_cls: Callable[[int], nn.Module] | None = None,
                 norm_cls: Callable[[int], nn.Module] | None = None, fused_add_norm: bool = False,
                 residual_in_fp32: bool = False, drop_path: float = 0.0):
        super().__init__()
        norm_cls = norm_cls or partial(RMSNorm, eps=1e-5)
        self.dim = dim
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not None and mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _add_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        residual = self._add(hidden, residual)
        return self._normalise(norm, residual), self._upcast(residual)

    def _add(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return hidden if residual is None else residual + self.drop_path(hidden)

    @staticmethod
    def _normalise(norm: nn.Module, residual: torch.Tensor) -> torch.Tensor:
        return norm(residual.to(dtype=norm.weight.dtype))

    def _upcast(self, residual: torch.Tensor) -> torch.Tensor:
        if self.residual_in_fp32 and residual.dtype in (torch.float16, torch.bfloat16):
            residual = residual.to(torch.float32)      # an upcast only: a float64 stream stays float64
        return residual

    def _recomputes_norm(self, residual: torch.Tensor) -> bool:
        """Whether the norm's output is recomputed in the backward rather than kept (`output_recomputed`): with a
        memory-efficient mixer, when a backward can follow."""
        return (getattr(self.mixer, "memory_efficient", False) and torch.is_grad_enabled()
                and (residual.requires_grad or any(p.requires_grad for p in self.parameters())))

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None, **mixer_kwargs):
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.dim:
            raise ValueError(f"Block: hidden_states has shape {tuple(hidden_states.shape)}, expected "
                             f"(batch, length, {self.dim})")
        if residual is not None and residual.shape != hidden_states.shape:
            raise ValueError(f"Block: residual has shape {tuple(residual.shape)}, expected "
                             f"{tuple(hidden_states.shape)} (the shape of hidden_states)")
        residual = self._add(hidden_states, residual)
        kwargs = {k: v for k, v in mixer_kwargs.items() if v is not None}
        if inference_params is not None:
            kwargs["inference_params"] = inference_params
        normalise = partial(self._normalise, self.norm)
        if inference_params is None and self._recomputes_norm(residual):
            hidden_states = output_recomputed(normalise, residual, lambda h: self.mixer(h, **kwargs),
                                            tuple(self.norm.parameters()))
        else:
            hidden_states = self.mixer(normalise(residual), **kwargs)
        residual = self._upcast(residual)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(hidden_states, residual, self.norm2)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)


def init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                 rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    """mamba_ssm's `_init_weights`, to use as `model.apply(partial(init_weights, n_layer=...))`.

    Linear biases -> 0 (except those marked `_no_reinit`, i.e. dt_proj biases); Embedding ~ N(0, 0.02);
    every `out_proj.weight` / `fc2.weight` directly below `module` -> kaiming_uniform(a=sqrt(5)) divided by
    sqrt(n_residuals_per_layer * n_layer) (GPT-2's residual scaling; re-initialised, so applying it twice is
    the same as once).
    """
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


def drop_path_schedule(rate: float, n_layer: int) -> list[float]:
    """Vim's stochastic-depth rates: layer i gets ([0] + linspace(0, rate, n_layer))[i]; the final add `rate`."""
    rates = [0.0] + torch.linspace(0, rate, n_layer).tolist() if n_layer > 0 else [0.0]
    return rates[:n_layer] + [rate]


def create_block(d_model: int, layer_idx: int, ssm_cfg: dict | None = None, d_intermediate: int = 0,
                 norm_epsilon: float = 1e-5, rms_norm: bool = True, residual_in_fp32: bool = False,
                 drop_path: float = 0.0, mixer_cls: Callable[..., nn.Module] | None = None,
                 device=None, dtype=None) -> Block:
    """One backbone block. ssm_cfg["layer"] picks the mixer (see MIXERS; default "Mamba1"), the rest of
    ssm_cfg are its keyword arguments; or mixer_cls(d_model, layer_idx=..., device=..., dtype=...)."""
    fk = {"device": device, "dtype": dtype}
    if mixer_cls is not None:
        if ssm_cfg:
            raise ValueError("create_block: pass either mixer_cls or ssm_cfg, not both")
        mixer = partial(mixer_cls, layer_idx=layer_idx, **fk)
    else:
        cfg = dict(ssm_cfg or {})
        layer = cfg.pop("layer", "Mamba1")
        if layer not in MIXERS:
            raise ValueError(f"create_block: unknown ssm_cfg layer {layer!r}; expected one of {sorted(MIXERS)}")
        if MIXERS[layer] is PerOrderMamba:
            mixer = partial(PerOrderMamba, **cfg, **fk)
        else:
            mixer = partial(MIXERS[layer], layer_idx=layer_idx, **cfg, **fk)
    norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **fk)
    mlp_cls = None if d_intermediate == 0 else partial(GatedMLP, hidden_features=d_intermediate,
                                                       out_features=d_model, **fk)
    block = Block(d_model, mixer, mlp_cls, norm_cls=norm_cls, residual_in_fp32=residual_in_fp32, drop_path=drop_path)
    block.layer_idx = layer_idx
    return block


class MixerModel(nn.Module):
    """The backbone: [embedding] -> n_layer Blocks -> add -> norm_f. Returns (b, L, d_model).

    vocab_size: None for models fed embeddings (vision, pathology, ...), else an `embedding` Embedding.
    ssm_cfg / mixer_cls: the mixer of every layer (see `create_block`). rms_norm: RMSNorm (default) or
    LayerNorm. drop_path_rate: a float gives Vim's schedule (`drop_path_schedule`); a sequence gives
    n_layer + 1 rates (per layer, then the final add). init: apply `init_weights` (initializer_cfg: its
    keyword arguments), as mamba_ssm does at construction.

    forward(input_ids=None, inputs_embeds=None, inference_params=None, lengths=None, **mixer_kwargs).
    """

    def __init__(self, d_model: int, n_layer: int, vocab_size: int | None = None, ssm_cfg: dict | None = None,
                 mixer_cls: Callable[..., nn.Module] | None = None, d_intermediate: int = 0,
                 norm_epsilon: float = 1e-5, rms_norm: bool = True, residual_in_fp32: bool = False,
                 drop_path_rate: float | Sequence[float] = 0.0, initializer_cfg: dict | None = None,
                 init: bool = True, fused_add_norm: bool = False, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        if isinstance(drop_path_rate, (int, float)):
            rates = drop_path_schedule(float(drop_path_rate), n_layer)
        else:
            rates = [float(r) for r in drop_path_rate]
            if len(rates) != n_layer + 1:
                raise ValueError(f"MixerModel: drop_path_rate has {len(rates)} rates, expected n_layer + 1 = "
                                 f"{n_layer + 1} (one per layer, then the final add)")
        self.d_model = d_model
        self.residual_in_fp32 = residual_in_fp32
        self.embedding = nn.Embedding(vocab_size, d_model, **fk) if vocab_size is not None else None
        self.layers = nn.ModuleList([
            create_block(d_model, i, ssm_cfg=ssm_cfg, d_intermediate=d_intermediate, norm_epsilon=norm_epsilon,
                         rms_norm=rms_norm, residual_in_fp32=residual_in_fp32, drop_path=rates[i],
                         mixer_cls=mixer_cls, **fk)
            for i in range(n_layer)
        ])
        self.final_drop_path = DropPath(rates[-1]) if rates[-1] > 0 else nn.Identity()
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(d_model, eps=norm_epsilon, **fk)
        if init:
            self.apply(partial(init_weights, n_layer=n_layer, **(initializer_cfg or {}),
                               n_residuals_per_layer=1 if d_intermediate == 0 else 2))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs) -> dict:
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None, lengths: torch.Tensor | None = None,
                **mixer_kwargs) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MixerModel: pass exactly one of input_ids (batch, length) and inputs_embeds "
                             f"(batch, length, {self.d_model})")
        if input_ids is not None:
            if self.embedding is None:
                raise ValueError("MixerModel: this backbone has no embedding (vocab_size=None); pass inputs_embeds")
            if input_ids.dim() != 2:
                raise ValueError(f"MixerModel: input_ids has shape {tuple(input_ids.shape)}, expected (batch, length)")
            hidden = self.embedding(input_ids)
        else:
            hidden = inputs_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, inference_params=inference_params, lengths=lengths,
                                     **mixer_kwargs)
        residual = hidden if residual is None else residual + self.final_drop_path(hidden)
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))
