"""Multi-order mixers: one sequence scanned in K orders, outputs merged.

`MultiOrderMamba`: K orders share in_proj, out_proj and the z gate; each order has its own conv1d, x_proj,
dt_proj, A_log and D (Vim's bimamba v2, MambaMIL's SR-Mamba and BiMamba, PCM's and ShuffleMamba's
bidirectional mixers, the hierarchical scans of Motion Mamba):

    x, z = in_proj(h)                                    (b, d_inner, L) each, shared
    y_k = restore(branch_k(reorder(x, order_k), reorder(z, order_k)))
                                                         each branch a causal Mamba SSM with z gating
    out = out_proj(merge(y_1..y_K))

Between in_proj and out_proj the tensors are (b, d_inner, L): orders gather along the last axis and the merges
work in that layout (see `mambakit.core.layout`). Where the scan is the fused CPU kernel and every order is
the identity or a flip (Vim, BiMamba), the memory is token-major and a flip order is a branch that runs
backwards in time in the kernels (see `mambakit.core.mamba`); with gathering orders it is contiguous
channel-major. A zero token of
a padded order (stride-R) is zero in x and z, as upstream pads xz.

Parameter names: order 0 keeps the plain names (`conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`). With K=2 the
second set is Vim's / MambaMIL's `conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`. With K>2, order k
gets the suffix `_k` (`conv1d_1`, `A_1_log`, `D_1`, ... `conv1d_{K-1}`). `param_suffixes` overrides this.

Merges: "sum" (SR-Mamba, PCM, MambaMIL BiMamba), "mean" (Vim's if_divide_out=True, ShuffleMamba),
"concat" (concatenate the K outputs, then `merge_proj`: Linear(K d_inner -> d_inner, no bias)), "gate"
(per-token softmax weights over the K orders from `merge_gate`: Linear(K d_inner -> K), weighted sum).

`PerOrderMamba`: K independent full mixers (own in_proj/out_proj), one per order, outputs summed, averaged or
concatenated (S-Mamba: x + Mamba(x) + flip(Mamba_r(flip(x))) is orders (identity, flip), merge "sum";
SEMamba concatenates, giving K * d_model features for the app's own projection).

Neither is causal, so neither has a recurrent `step()` (use `Mamba` for decoding).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.core.layout import channel_major_linear
from mambakit.core.mamba import (MEMORY_EFFICIENT, Mamba, SelectiveSSM, check_hidden, check_lengths,
                                 compute_dtype, length_mask)
from mambakit.core.orders import OrderIndices, ScanOrder, StrideOrder, orders_from, reorder, restore

__all__ = ["MultiOrderMamba", "PerOrderMamba", "default_suffixes", "MERGES"]

MERGES = ("sum", "mean", "concat", "gate")


def default_suffixes(k: int) -> list[str]:
    """Parameter-name suffixes of K orders: [""], ["", "_b"], or ["", "_1", ..., "_{K-1}"]."""
    if k == 1:
        return [""]
    if k == 2:
        return ["", "_b"]
    return [""] + [f"_{i}" for i in range(1, k)]


def _order_indices(owner: str, orders: tuple[ScanOrder, ...], seqlen: int, lengths, hw, coords, device,
                   order_indices: Sequence[OrderIndices] | None) -> list[OrderIndices]:
    if order_indices is not None:
        if len(order_indices) != len(orders):
            raise ValueError(f"{owner}: {len(order_indices)} order_indices given for {len(orders)} orders")
        for k, idx in enumerate(order_indices):
            if not isinstance(idx, OrderIndices) or idx.n_tokens != seqlen:
                raise ValueError(f"{owner}: order_indices[{k}] must be OrderIndices for {seqlen} tokens")
        return list(order_indices)
    return [o.indices(seqlen, lengths=lengths, hw=hw, coords=coords, device=device) for o in orders]


def _merge_check(owner: str, merge: str, allowed=MERGES) -> None:
    if merge not in allowed:
        raise ValueError(f"{owner}: unknown merge {merge!r}; expected one of {allowed}")


def _not_causal(owner: str, orders) -> RuntimeError:
    names = tuple(o.name for o in orders)
    return RuntimeError(f"{owner} with orders {names} is not causal, so it has no recurrent step(): run "
                        f"forward() on the whole sequence (inference_params must be None)")


class MultiOrderMamba(SelectiveSSM):
    """K scan orders over one Mamba mixer with shared projections. hidden_states (b, L, d_model) -> same.

    orders: names or ScanOrder objects (see mambakit.core.orders); merge: "sum" | "mean" | "concat" | "gate".
    init_layer_scale: Vim's optional layer scale (a parameter `gamma` (d_model,) multiplying the output).
    Other arguments as `Mamba` (memory_efficient: each order's branch keeps only its x_dbl and the scan's
    checkpoints; in_proj's x, z are recomputed in the backward, once, shared by the orders, and each order's
    reordered x / z, conv output, silu and delta from them). Every order's dt_proj gets
    mamba_ssm's dt initialisation (as MambaMIL does; Vim's code leaves `dt_proj_b` at PyTorch's default Linear
    init, with its bias later zeroed by `_init_weights`).

    forward(hidden_states, lengths=None, hw=None, coords=None, order_indices=None, inference_params=None):
      lengths (b,) right padding; hw=(H, W) for grid orders; coords (b, L, 3) for point orders;
      order_indices: precomputed `OrderIndices` per order (e.g. shared by every layer of a backbone).
    """

    def __init__(self, d_model: int, orders: Sequence[str | ScanOrder] = ("identity", "flip"), merge: str = "mean",
                 d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto", dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, layer_idx: int | None = None,
                 scan_backend: str = "auto", param_suffixes: Sequence[str] | None = None,
                 init_layer_scale: float | None = None, memory_efficient: bool = MEMORY_EFFICIENT, device=None,
                 dtype=None):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale,
                         dt_init_floor, conv_bias, bias, layer_idx, scan_backend, memory_efficient, device, dtype)
        self.orders = orders_from(orders)
        _merge_check("MultiOrderMamba", merge)
        self.merge = merge
        K = len(self.orders)
        suffixes = list(param_suffixes) if param_suffixes is not None else default_suffixes(K)
        if len(suffixes) != K or len(set(suffixes)) != K:
            raise ValueError(f"MultiOrderMamba: param_suffixes must be {K} distinct strings, got {suffixes}")
        self.suffixes = suffixes
        fk = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        for s in suffixes:
            self._add_ssm_params(s)
        if merge == "concat":
            self.merge_proj = nn.Linear(K * self.d_inner, self.d_inner, bias=False, **fk)
        elif merge == "gate":
            self.merge_gate = nn.Linear(K * self.d_inner, K, bias=True, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)
        self.init_layer_scale = init_layer_scale
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(init_layer_scale * torch.ones(d_model, **fk))

    # -- named configurations -------------------------------------------------------------------------
    @classmethod
    def vim(cls, d_model: int, if_divide_out: bool = True, **kwargs) -> "MultiOrderMamba":
        """Vim's bimamba v2: (identity, flip), outputs averaged (if_divide_out=True, Vim's default) or summed."""
        return cls(d_model, orders=("identity", "flip"), merge="mean" if if_divide_out else "sum", **kwargs)

    @classmethod
    def bimamba(cls, d_model: int, **kwargs) -> "MultiOrderMamba":
        """MambaMIL's / PCM's BiMamba: (identity, flip), outputs summed."""
        return cls(d_model, orders=("identity", "flip"), merge="sum", **kwargs)

    @classmethod
    def sr(cls, d_model: int, rate: int = 10, pad: bool = True, **kwargs) -> "MultiOrderMamba":
        """MambaMIL's SR-Mamba: (identity, stride-R reorder with zero padding), outputs summed."""
        return cls(d_model, orders=("identity", StrideOrder(rate, pad=pad)), merge="sum", **kwargs)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, lengths: torch.Tensor | None = None, hw=None,
                coords: torch.Tensor | None = None, order_indices: Sequence[OrderIndices] | None = None,
                inference_params=None) -> torch.Tensor:
        if inference_params is not None:
            raise _not_causal("MultiOrderMamba", self.orders)
        b, L = check_hidden("MultiOrderMamba", hidden_states, self.d_model)
        lengths = check_lengths("MultiOrderMamba", lengths, b, L, hidden_states.device)
        idxs = _order_indices("MultiOrderMamba", self.orders, L, lengths, hw, coords, hidden_states.device,
                              order_indices)
        token_major = self._token_major(hidden_states) and all(i.is_identity or i.is_flip for i in idxs)
        x, z = self._in_proj(hidden_states, token_major)
        if self._lean(x):
            source = self._in_proj_source(hidden_states, token_major)
            ys = [self._branch_lean(x, z, source, s, reverse=idx.is_flip) if token_major
                  else self._branch_lean(x, z, source, s, idx) for s, idx in zip(self.suffixes, idxs)]
        elif token_major and self._sums_in_place(x):
            y = self._branch(x, z, self.suffixes[0], reverse=idxs[0].is_flip)
            for s, idx in zip(self.suffixes[1:], idxs[1:]):
                self._branch(x, z, s, reverse=idx.is_flip, accumulate_into=y)
            ys = [y.div_(len(idxs)) if self.merge == "mean" else y]
        elif token_major:
            ys = [self._branch(x, z, s, reverse=idx.is_flip) for s, idx in zip(self.suffixes, idxs)]
        else:
            ys = [restore(self._branch(reorder(x, idx, dim=-1), reorder(z, idx, dim=-1), s), idx, dim=-1)
                  for s, idx in zip(self.suffixes, idxs)]
        out = self._out_proj(self._merge(ys))
        if self.init_layer_scale is not None:
            out = out * self.gamma
        if lengths is not None:
            out = out.masked_fill(~length_mask(lengths, L)[..., None], 0.0)
        return out

    def _sums_in_place(self, x: torch.Tensor) -> bool:
        """Whether the orders' outputs are summed as they are written (each order after the first adds into the
        first's output): at inference, for a sum or mean merge, where the scan is the fused CPU kernel."""
        A_log = self._params(self.suffixes[0])[3]
        return (len(self.orders) > 1 and self.merge in ("sum", "mean") and not self._records_grad(x)
                and self._projected_scan(x) and x.dtype == compute_dtype(A_log))   # the kernel's compute dtype

    def _merge(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """K outputs (b, d_inner, L) -> (b, d_inner, L)."""
        if len(ys) == 1:
            return ys[0]
        if self.merge in ("sum", "mean"):
            y = ys[0] + ys[1]
            for other in ys[2:]:
                y += other
            return y.div_(len(ys)) if self.merge == "mean" else y
        cat = torch.cat(ys, dim=1)                                                      # (b, K d_inner, L)
        if self.merge == "concat":
            return channel_major_linear(cat, self.merge_proj.weight, self.merge_proj.bias)
        weights = torch.softmax(channel_major_linear(cat, self.merge_gate.weight, self.merge_gate.bias), dim=1)
        y = ys[0] * weights[:, :1]                                                      # weights (b, K, L)
        for k in range(1, len(ys)):
            y += ys[k] * weights[:, k:k + 1]
        return y

    def step(self, *args, **kwargs):
        raise _not_causal("MultiOrderMamba", self.orders)

    def allocate_inference_cache(self, *args, **kwargs):
        raise _not_causal("MultiOrderMamba", self.orders)

    def extra_repr(self) -> str:
        return f"orders={tuple(o.name for o in self.orders)}, merge={self.merge!r}"


class PerOrderMamba(nn.Module):
    """K independent mixers, one per order, each with its own in/out projections; outputs merged.

    mixers[k] sees the sequence in order k: out = merge_k(restore(mixers[k](reorder(h, order_k)))).
    merge "sum" | "mean" -> (b, L, d_model); "concat" -> (b, L, K * d_model) (no projection: SEMamba-style
    models apply their own). mixer_factory(k) builds mixer k (default: Mamba(d_model, **mamba_kwargs)).
    Zero tokens of padded orders (stride-R) are zero hidden states.
    """

    def __init__(self, d_model: int, orders: Sequence[str | ScanOrder] = ("identity", "flip"), merge: str = "sum",
                 mixer_factory: Callable[[int], nn.Module] | None = None, **mamba_kwargs):
        super().__init__()
        self.d_model = d_model
        self.orders = orders_from(orders)
        _merge_check("PerOrderMamba", merge, ("sum", "mean", "concat"))
        self.merge = merge
        if mixer_factory is not None and mamba_kwargs:
            raise ValueError(f"PerOrderMamba: pass either mixer_factory or Mamba keyword arguments, "
                             f"not both (got {sorted(mamba_kwargs)})")
        factory = mixer_factory or (lambda k: Mamba(d_model, **mamba_kwargs))
        self.mixers = nn.ModuleList([factory(k) for k in range(len(self.orders))])
        self.out_features = d_model * (len(self.orders) if merge == "concat" else 1)

    def forward(self, hidden_states: torch.Tensor, lengths: torch.Tensor | None = None, hw=None,
                coords: torch.Tensor | None = None, order_indices: Sequence[OrderIndices] | None = None,
                inference_params=None) -> torch.Tensor:
        if inference_params is not None:
            raise _not_causal("PerOrderMamba", self.orders)
        b, L = check_hidden("PerOrderMamba", hidden_states, self.d_model)
        lengths = check_lengths("PerOrderMamba", lengths, b, L, hidden_states.device)
        idxs = _order_indices("PerOrderMamba", self.orders, L, lengths, hw, coords, hidden_states.device,
                              order_indices)
        ys = [restore(m(reorder(hidden_states, idx)), idx) for m, idx in zip(self.mixers, idxs)]
        if self.merge == "concat":
            out = torch.cat(ys, dim=-1)
        else:
            out = ys[0]
            for other in ys[1:]:
                out = out + other
            if self.merge == "mean":
                out = out / len(ys)
        if lengths is not None:
            out = out.masked_fill(~length_mask(lengths, L)[..., None], 0.0)
        return out

    def step(self, *args, **kwargs):
        raise _not_causal("PerOrderMamba", self.orders)

    def allocate_inference_cache(self, *args, **kwargs):
        raise _not_causal("PerOrderMamba", self.orders)

    def extra_repr(self) -> str:
        return f"orders={tuple(o.name for o in self.orders)}, merge={self.merge!r}"
