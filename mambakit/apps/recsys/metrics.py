"""Full-ranking metrics as RecBole 1.2.1 computes them, for one held-out item per example.

RecBole ranks every item for every evaluation example (`Trainer._full_sort_batch_eval`), sets the padding
item's score to -inf, takes `torch.topk(scores, max(topk))` (`Collector.eval_batch_collect`) and reads the
metrics off where the held-out item lands in that list (recbole/evaluator/metrics.py):

    HR@K   = 1 if the item is among the first K
    NDCG@K = 1 / log2(rank + 1) if rank <= K (the ideal DCG of one relevant item is 1)
    MRR@K  = 1 / rank if rank <= K

Ties: RecBole keeps whatever order `torch.topk` returns among equal scores, which is unspecified (it is
not the item order, and differs between CPU and CUDA). Here equal scores are ordered by item id, lower
first, the order a stable sort gives: `target_rank` is 1 + (items scoring higher) + (items with the same
score and a lower id). Trained models rarely tie; the most-popular baseline ties often (many items have the
same count), so its numbers can differ from RecBole's in the last digits. A NaN target score is never a
hit. `target_rank` returns the 1-based rank when it is <= `max_k`, 0 otherwise; every metric is a function
of that one integer per example, which is what evaluation gathers across processes.

History masking: RecBole 1.2.1 does NOT mask the items a user has already interacted with for sequential
models: `FullSortEvalDataLoader.collate_fn` returns `history_index = None` when `is_sequential`
(recbole/data/dataloader/general_dataloader.py, lines 281-288), and the trainer masks only column 0 and the
given history (recbole/trainer/trainer.py, lines 536-539). `mask_history_` implements the general-model
behaviour as an option: every earlier item of the user except the target itself gets -inf
(RecBole's `history_item = used_item - positive_item`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["target_rank", "ranking_metrics", "mask_history_", "metric_names"]


def target_rank(scores: torch.Tensor, target: torch.Tensor, max_k: int) -> torch.Tensor:
    """1-based rank of `target` among all items (equal scores: lower item id first), 0 when it is > max_k.

    scores: (b, n_items) with column 0 (padding) already -inf; target: (b,) int64. Returns (b,) int64.
    """
    if scores.dim() != 2 or target.shape != scores.shape[:1]:
        raise ValueError(f"target_rank: scores must be (b, n_items) and target (b,), got {tuple(scores.shape)} "
                         f"and {tuple(target.shape)}")
    own = scores.gather(1, target.unsqueeze(1))                              # (b, 1)
    ids = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > own) | ((scores == own) & (ids < target.unsqueeze(1)))
    rank = ahead.sum(1) + 1
    valid = (rank <= max_k) & ~torch.isnan(own.squeeze(1))
    return torch.where(valid, rank, torch.zeros_like(rank)).to(torch.long)


def metric_names(ks: Sequence[int]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("hit", "ndcg", "mrr")]


def ranking_metrics(rank: torch.Tensor, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """HR@K, NDCG@K, MRR@K averaged over examples, from `target_rank`'s output (which must have used
    max_k >= max(ks))."""
    rank = rank.to(torch.float64)
    found = rank > 0
    out: dict[str, float] = {}
    n = max(len(rank), 1)
    for k in ks:
        inside = found & (rank <= k)
        safe = torch.where(inside, rank, torch.ones_like(rank))
        out[f"hit@{k}"] = float(inside.sum()) / n
        out[f"ndcg@{k}"] = float(torch.where(inside, 1.0 / torch.log2(safe + 1.0), 0.0).sum()) / n
        out[f"mrr@{k}"] = float(torch.where(inside, 1.0 / safe, 0.0).sum()) / n
    return out


def mask_history_(scores: torch.Tensor, items: torch.Tensor, history_start: torch.Tensor,
                  target_pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, the score of every item in each example's full history `items[start:target_pos]`,
    except the target item itself. scores: (b, n_items); items: the flat item array (on scores' device)."""
    lengths = (target_pos - history_start).clamp(min=0)
    total = int(lengths.sum())
    if total == 0:
        return scores
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=scores.device), lengths)
    first = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    flat = torch.repeat_interleave(history_start, lengths) + (torch.arange(total, device=scores.device) - first)
    kept = scores.gather(1, target.unsqueeze(1))
    scores[rows, items[flat]] = -math.inf
    scores.scatter_(1, target.unsqueeze(1), kept)
    return scores
