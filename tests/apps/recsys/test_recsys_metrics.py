"""Full-ranking metrics against hand-computed values and against RecBole 1.2.1's own procedure (topk ->
positive matrix -> cumulative formulas), ties included; history masking on and off."""

import math

import numpy as np
import pytest
import torch

from mambakit.apps.recsys.metrics import mask_history_, ranking_metrics, target_rank


def test_hand_computed_values():
    ninf = -math.inf
    scores = torch.tensor([
        [ninf, 0.9, 0.1, 0.5, 0.3, 0.2],      # target 1 is first
        [ninf, 0.9, 0.1, 0.5, 0.3, 0.2],      # target 4: order 1, 3, 4 -> rank 3
        [ninf, 0.9, 0.1, 0.5, 0.3, 0.2],      # target 2: rank 5 -> outside top-3
        [ninf, 0.1, 0.2, 0.3, 0.4, 0.5],      # target 4: rank 2
    ])
    target = torch.tensor([1, 4, 2, 4])
    rank = target_rank(scores, target, max_k=3)
    assert rank.tolist() == [1, 3, 0, 2]
    m = ranking_metrics(rank, ks=(1, 2, 3))
    assert m["hit@1"] == pytest.approx(1 / 4)
    assert m["hit@2"] == pytest.approx(2 / 4)
    assert m["hit@3"] == pytest.approx(3 / 4)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["ndcg@3"] == pytest.approx((1 + 0.5 + 1 / math.log2(3)) / 4)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 4)
    assert m["mrr@1"] == pytest.approx(1 / 4)


def test_padding_column_never_ranks():
    scores = torch.tensor([[-math.inf, 0.0, 0.0]])
    assert target_rank(scores, torch.tensor([2]), max_k=3).item() in (1, 2)
    assert target_rank(scores, torch.tensor([0]), max_k=2).item() == 0


def recbole_reference(scores: torch.Tensor, target: torch.Tensor, ks) -> dict[str, float]:
    """RecBole 1.2.1's Collector.eval_batch_collect ('rec.topk') and metrics.py Hit/NDCG/MRR, written out."""
    topk_idx = torch.topk(scores, max(ks), dim=-1).indices
    pos_matrix = torch.zeros_like(scores, dtype=torch.int)
    pos_matrix[torch.arange(len(target)), target] = 1
    pos_len = pos_matrix.sum(dim=1, keepdim=True)
    pos_index = torch.gather(pos_matrix, 1, topk_idx).numpy().astype(bool)
    pos_len = pos_len.numpy().squeeze(1)
    hit = (np.cumsum(pos_index, axis=1) > 0).astype(int)
    idxs = pos_index.argmax(axis=1)
    mrr = np.zeros_like(pos_index, dtype=float)
    for row, idx in enumerate(idxs):
        mrr[row, idx:] = 1 / (idx + 1) if pos_index[row, idx] > 0 else 0
    len_rank = np.full_like(pos_len, pos_index.shape[1])
    idcg_len = np.where(pos_len > len_rank, len_rank, pos_len)
    iranks = np.zeros_like(pos_index, dtype=float)
    iranks[:, :] = np.arange(1, pos_index.shape[1] + 1)
    idcg = np.cumsum(1.0 / np.log2(iranks + 1), axis=1)
    for row, idx in enumerate(idcg_len):
        idcg[row, idx:] = idcg[row, idx - 1]
    dcg = np.cumsum(np.where(pos_index, 1.0 / np.log2(iranks + 1), 0), axis=1)
    ndcg = dcg / idcg
    out = {}
    for k in ks:
        out[f"hit@{k}"] = hit[:, k - 1].mean()
        out[f"ndcg@{k}"] = ndcg[:, k - 1].mean()
        out[f"mrr@{k}"] = mrr[:, k - 1].mean()
    return out


@pytest.mark.parametrize("levels", [3, 1000])
def test_matches_recbole_procedure_with_ties(levels):
    # Few distinct score levels: many ties, also across the top-k boundary.
    gen = torch.Generator().manual_seed(levels)
    scores = torch.randint(0, levels, (64, 40), generator=gen).float()
    scores[:, 0] = -math.inf
    target = torch.randint(1, 40, (64,), generator=gen)
    ks = (5, 10, 20)
    ours = ranking_metrics(target_rank(scores, target, max(ks)), ks)
    ref = recbole_reference(scores, target, ks)
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_history_masking_on_and_off():
    items = torch.tensor([3, 1, 2, 3, 4, 5])          # one user's flat sequence
    scores = torch.tensor([[-math.inf, 0.9, 0.8, 0.7, 0.6, 0.1],
                           [-math.inf, 0.9, 0.8, 0.7, 0.6, 0.1]], dtype=torch.float64)
    # Example 0: history items[0:4] = 3, 1, 2, 3, target 4. Example 1: history items[0:2] = 3, 1, target 3
    # (a repeat: the target itself stays rankable).
    start, target_pos, target = torch.tensor([0, 0]), torch.tensor([4, 2]), torch.tensor([4, 3])
    unmasked = target_rank(scores, target, 5)
    assert unmasked.tolist() == [4, 3]
    masked = mask_history_(scores.clone(), items, start, target_pos, target)
    assert masked[0].tolist() == [-math.inf, -math.inf, -math.inf, -math.inf, 0.6, 0.1]
    assert masked[1].tolist() == [-math.inf, -math.inf, 0.8, 0.7, 0.6, 0.1]
    assert target_rank(masked, target, 5).tolist() == [1, 2]
    # An example with an empty history is left alone.
    same = mask_history_(scores.clone(), items, torch.tensor([0, 2]), torch.tensor([0, 2]), target)
    assert torch.equal(same, scores)
