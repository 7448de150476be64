"""A language-model wrapper with `mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel`'s configuration and
state-dict keys (`backbone.embedding.weight`, `backbone.layers.{i}.mixer.*`, `backbone.layers.{i}.norm.weight`,
`backbone.norm_f.weight`, `lm_head.weight` tied to the embedding), so published checkpoints load with
strict=True, and greedy generation through the mixers' recurrent `step()`.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from mambakit.core.block import MixerModel, init_weights
from mambakit.core.cache import InferenceParams

__all__ = ["MambaConfig", "MambaLMHeadModel", "CausalLMOutput", "padded_vocab_size"]

CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


@dataclass
class MambaConfig:
    """mamba_ssm's MambaConfig (the fields of a published `config.json`). `fused_add_norm` is accepted and
    has no effect (the unfused path computes the same); attention layers are not supported."""

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round vocab_size up to a multiple (50277 -> 50280 for multiple 8), as mamba_ssm does."""
    return vocab_size if vocab_size % multiple == 0 else vocab_size + multiple - vocab_size % multiple


class MambaLMHeadModel(nn.Module):
    """backbone (MixerModel with an embedding) + lm_head. forward(input_ids) -> CausalLMOutput(logits)."""

    def __init__(self, config: MambaConfig, initializer_cfg: dict | None = None, device=None, dtype=None):
        super().__init__()
        if config.attn_layer_idx:
            raise ValueError(f"MambaLMHeadModel: attention layers (attn_layer_idx={config.attn_layer_idx}) are "
                             f"not supported")
        self.config = config
        vocab = padded_vocab_size(config.vocab_size, config.pad_vocab_size_multiple)
        self.backbone = MixerModel(config.d_model, config.n_layer, vocab_size=vocab, ssm_cfg=config.ssm_cfg,
                                   d_intermediate=config.d_intermediate, rms_norm=config.rms_norm,
                                   residual_in_fp32=config.residual_in_fp32, initializer_cfg=initializer_cfg,
                                   device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, vocab, bias=False, device=device, dtype=dtype)
        self.apply(partial(init_weights, n_layer=config.n_layer, **(initializer_cfg or {})))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs) -> dict:
        return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids: torch.Tensor, position_ids=None, inference_params: InferenceParams | None = None,
                num_last_tokens: int = 0, lengths: torch.Tensor | None = None, **mixer_kwargs) -> CausalLMOutput:
        """input_ids (b, L) -> logits (b, L, padded vocab) (the last num_last_tokens positions if > 0).
        position_ids is accepted for Transformer-style callers and unused."""
        hidden = self.backbone(input_ids, inference_params=inference_params, lengths=lengths, **mixer_kwargs)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_length: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding: prefill the prompt (b, L) with one forward, then one `step()` per new token, until
        max_length tokens in all (prompt included) or every sequence has produced eos_token_id. Returns the
        token ids (b, <= max_length). Logits of padded vocabulary entries are never chosen."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"generate: input_ids has shape {tuple(input_ids.shape)}, expected (batch, length >= 1)")
        b, L = input_ids.shape
        if max_length <= L:
            raise ValueError(f"generate: max_length={max_length} must exceed the prompt length {L}")
        params = InferenceParams(max_seqlen=max_length, max_batch_size=b)
        vocab = self.config.vocab_size
        logits = self(input_ids, inference_params=params, num_last_tokens=1).logits[:, -1, :vocab]
        params.seqlen_offset = L
        tokens = [input_ids]
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        while True:
            nxt = logits.argmax(dim=-1)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            if params.seqlen_offset + 1 >= max_length or bool(finished.all()):
                break
            logits = self(nxt[:, None], inference_params=params).logits[:, -1, :vocab]
            params.seqlen_offset += 1
        return torch.cat(tokens, dim=1)
