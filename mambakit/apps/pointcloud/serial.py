"""Sampling and neighbours from a space-filling serialization, for clouds too large for exact FPS and kNN.

Farthest point sampling costs O(N x S) and exact kNN O(N x M): both quadratic in the cloud size, so at 64k
points per cloud they dominate every model that uses them (PCM, PointNet++, Point Transformer). Sorting the
points along a Hilbert curve costs O(N log N) and keeps most spatial neighbours close in the sequence (the
property PCM's serialized scans rely on), which gives two cheap stand-ins:

- `serial_subsample`: every (N / S)-th point along the curve. The curve visits the cloud evenly, so the
  samples cover it about as evenly as FPS does (not as well at the far boundary points FPS favours).
- `serial_knn`: each query's k nearest among a window of `window` reference points around its own position
  on the curve, under `len(orders)` curves (a Hilbert curve and its transposed twin by default), merged.
  Approximate: a true neighbour across a curve's fold can be missed; `knn_recall` measures it.

Both are options of the models (`sampler="serial"`, `neighbours="serial"`); the defaults stay exact FPS and
kNN, which the published weights were trained with.
"""

from __future__ import annotations

import torch

from mambakit.core.orders import PointOrder

from .ops import index_points

__all__ = ["serial_subsample", "serial_knn", "knn_recall", "DEFAULT_ORDERS"]

DEFAULT_ORDERS = ("hilbert", "hilbert_trans")
#: cells per axis of the curve: bounded so that codes of unit-scale clouds never need more than 16 bits
_DEPTH = 10


def _curve_codes(pos: torch.Tensor, order: str) -> torch.Tensor:
    """(B, N, 3) -> (B, N) codes along `order` on a 2^_DEPTH grid over each cloud's bounding box."""
    lo = pos.amin(1, keepdim=True)
    span = (pos.amax(1, keepdim=True) - lo).amax(-1, keepdim=True).clamp_min(1e-12)
    cell = span / (2 ** _DEPTH - 1)                          # (B, 1, 1): the whole box fits the grid
    unit = (pos - lo) / cell                                  # grid units, so grid_size 1
    return PointOrder(order, grid_size=1.0, depth=_DEPTH).codes(unit.detach())


def serial_subsample(pos: torch.Tensor, n_samples: int, order: str = "hilbert") -> torch.Tensor:
    """(B, N, 3) -> (B, n_samples) indices, ascending: every (N / n_samples)-th point along the curve."""
    b, n, _ = pos.shape
    if not 1 <= n_samples <= n:
        raise ValueError(f"serial_subsample: n_samples must lie in [1, {n}], got {n_samples}")
    if n_samples == n:
        return torch.arange(n, device=pos.device).expand(b, n).clone()
    ranked = torch.argsort(_curve_codes(pos, order), dim=1, stable=True)
    picks = (torch.arange(n_samples, device=pos.device) * n) // n_samples
    return torch.sort(ranked[:, picks], dim=1).values


def _window_candidates(query_codes, ref_codes, window: int) -> torch.Tensor:
    """For each query, the indices of the `window` reference points around its place on the curve."""
    n = ref_codes.shape[1]
    sorted_codes, ref_rank = torch.sort(ref_codes, dim=1, stable=True)
    at = torch.searchsorted(sorted_codes, query_codes.contiguous())           # (B, M)
    start = (at - window // 2).clamp(0, max(n - window, 0))
    offsets = torch.arange(min(window, n), device=at.device)
    return ref_rank.gather(1, (start[..., None] + offsets).reshape(at.shape[0], -1)).reshape(*at.shape, -1)


def serial_knn(query: torch.Tensor, ref: torch.Tensor, k: int, window: int = 32,
               orders: tuple[str, ...] = DEFAULT_ORDERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate kNN: (squared distances (B, M, k), indices (B, M, k)), nearest first, from the windows
    of `orders`. Exact when every true neighbour lies in some window (always when window >= N)."""
    b, m, _ = query.shape
    n = ref.shape[1]
    if k < 1 or window < 1:
        raise ValueError(f"serial_knn: need k >= 1 and window >= 1, got k={k}, window={window}")
    both = torch.cat([query, ref], 1).detach()
    cands = []
    for order in orders:
        codes = _curve_codes(both, order)                    # one grid for queries and references
        cands.append(_window_candidates(codes[:, :m], codes[:, m:], window))
    cand = torch.cat(cands, -1)                               # (B, M, W * orders), may repeat an index
    d = (query.detach()[:, :, None, :] - index_points(ref.detach(), cand)).square().sum(-1)
    # a repeated candidate must not fill two of the k slots: push every copy after the first to +inf
    cand_sorted, order_idx = torch.sort(cand, -1)
    repeat = torch.zeros_like(cand, dtype=torch.bool)
    repeat.scatter_(-1, order_idx[..., 1:], cand_sorted[..., 1:] == cand_sorted[..., :-1])
    d = d.masked_fill(repeat, float("inf"))
    kk = min(k, n)
    top_d, pos = torch.topk(d, kk, dim=-1, largest=False, sorted=True)
    idx = cand.gather(-1, pos)
    if kk < k:
        top_d = torch.cat([top_d, top_d[..., :1].expand(b, m, k - kk)], -1)
        idx = torch.cat([idx, idx[..., :1].expand(b, m, k - kk)], -1)
    return top_d, idx


def knn_recall(approx_idx: torch.Tensor, exact_idx: torch.Tensor) -> float:
    """The fraction of the exact neighbours (B, M, k) that the approximate ones contain."""
    hits = (approx_idx[..., :, None] == exact_idx[..., None, :]).any(-2)
    return float(hits.float().mean())
