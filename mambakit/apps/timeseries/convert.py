"""Load weights trained with the upstream code (S-D-Mamba / iTransformer `checkpoint.pth`, a plain state dict).

Upstream layout -> ours (`Forecaster.net`):

    enc_embedding.value_embedding.*              -> enc_embedding.value_embedding.*
    encoder.attn_layers.{i}.attention.*          -> encoder.layers.{i}.mixer.mixers.0.*      (S-Mamba, forward)
    encoder.attn_layers.{i}.attention_r.*        -> encoder.layers.{i}.mixer.mixers.1.*      (S-Mamba, reversed)
    encoder.attn_layers.{i}.attention.{q,k,v,out}_projection.* -> encoder.layers.{i}.mixer.*  (iTransformer)
    encoder.attn_layers.{i}.conv{1,2}.weight (out, in, 1) -> encoder.layers.{i}.linear{1,2}.weight (out, in)
    encoder.attn_layers.{i}.norm{1,2}.*          -> encoder.layers.{i}.norm{1,2}.*
    encoder.norm.*, projector.*                  -> the same
    encoder.attn_layers.{i}.{man,man2,a}.*       -> dropped (S-Mamba builds them but never uses them)

The Mamba parameters keep mamba_ssm's names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj).
DLinear's keys are TSLib's already.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

__all__ = ["is_upstream_state_dict", "convert_upstream_state_dict", "UNUSED_UPSTREAM_MODULES"]

UNUSED_UPSTREAM_MODULES = ("man", "man2", "a")
_LAYER = re.compile(r"^encoder\.attn_layers\.(\d+)\.([A-Za-z0-9_]+)\.(.+)$")


def is_upstream_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.attn_layers.", "module.encoder.attn_layers.")) for k in state)


def convert_upstream_state_dict(state: Mapping[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    """Upstream S-Mamba / iTransformer keys -> ours (with `prefix`, "net." for a `Forecaster`)."""
    if state and all(k.startswith("module.") for k in state):      # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _LAYER.match(key)
        if m is None:
            out[prefix + key] = value
            continue
        i, part, rest = m.groups()
        layer = f"{prefix}encoder.layers.{i}."
        if part in UNUSED_UPSTREAM_MODULES:
            continue
        if part in ("attention", "attention_r") and rest.startswith(("query_projection", "key_projection",
                                                                     "value_projection", "out_projection")):
            out[layer + "mixer." + rest] = value                   # iTransformer's AttentionLayer
        elif part == "attention":
            out[layer + "mixer.mixers.0." + rest] = value
        elif part == "attention_r":
            out[layer + "mixer.mixers.1." + rest] = value
        elif part in ("conv1", "conv2"):
            name = "linear1" if part == "conv1" else "linear2"
            out[layer + f"{name}.{rest}"] = value.squeeze(-1) if rest == "weight" else value
        else:                                                      # norm1, norm2
            out[layer + f"{part}.{rest}"] = value
    return out
