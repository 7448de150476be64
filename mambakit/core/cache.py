"""Recurrent-inference state, shaped like `mamba_ssm.utils.generation.InferenceParams`.

A model decodes in two phases. Prefill: `forward` over the prompt with `seqlen_offset == 0` runs the
parallel scan and leaves each layer's states (conv window and SSM state) in `key_value_memory_dict[layer_idx]`.
Decoding: with `seqlen_offset > 0`, `forward` on one new token per sequence calls the mixer's `step()`, which
updates those states in place. (Several new tokens at once also work: they continue the scan from the
cached states.) The caller advances `seqlen_offset` by the number of tokens it fed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["InferenceParams", "states_from_cache"]


@dataclass
class InferenceParams:
    """What a model needs to carry between decoding calls.

    key_value_memory_dict maps a layer index to that layer's state tuple: (conv_state (b, d, d_conv),
    ssm_state (b, d, N)) for Mamba, (conv_state (b, conv_dim, d_conv), ssm_state (b, h, p, N)) for Mamba2.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: torch.Tensor | None = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start a new sequence: offset back to 0. Cached states are overwritten by the next prefill."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


def states_from_cache(module: nn.Module, inference_params: InferenceParams, batch_size: int,
                      allocate: Callable[[int], tuple]) -> tuple:
    """This layer's states, allocated on first use (`allocate(batch_size)`), checked on later uses."""
    layer_idx = getattr(module, "layer_idx", None)
    name = type(module).__name__
    if layer_idx is None:
        raise ValueError(f"{name}: inference_params needs the mixer's layer_idx (the key of its cached states); "
                         f"construct it with layer_idx=<int>")
    states = inference_params.key_value_memory_dict.get(layer_idx)
    if states is None:
        states = allocate(batch_size)
        inference_params.key_value_memory_dict[layer_idx] = states
    elif states[0].shape[0] != batch_size:
        raise ValueError(f"{name} (layer {layer_idx}): the cached states hold batch size {states[0].shape[0]}, "
                         f"the input has {batch_size}; call inference_params.key_value_memory_dict.clear() "
                         f"or use a new InferenceParams for a new batch")
    return states
