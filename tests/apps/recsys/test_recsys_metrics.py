"""Full-ranking metrics against an independent numpy reference written here by hand (rank = position in a
lexicographic sort by (-score, item id); HR / NDCG / MRR from their definitions), on small cases where a
plausible bug (rank off by one, ties counted the wrong way, the target masked, masking on when it should be
off) changes the number; RecBole 1.2.1's topk -> positive-matrix -> cumulative formulas on a stable order."""

import math

import numpy as np
import pytest
import torch

from mambakit.apps.recsys.metrics import mask_history_, ranking_metrics, target_rank

NINF = -math.inf


def np_rank(scores: np.ndarray, target: int) -> int:
    """1-based rank of `target`: sort all items by score descending, equal scores by item id ascending."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return int(np.flatnonzero(order == target)[0]) + 1


def np_metrics(ranks: list[int], ks) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"hit@{k}"] = float(np.mean([1.0 if r <= k else 0.0 for r in ranks]))
        out[f"ndcg@{k}"] = float(np.mean([1.0 / np.log2(r + 1) if r <= k else 0.0 for r in ranks]))
        out[f"mrr@{k}"] = float(np.mean([1.0 / r if r <= k else 0.0 for r in ranks]))
    return out


def np_mask(scores: np.ndarray, history: list[int], target: int) -> np.ndarray:
    """RecBole's general-model masking: every item seen before, except the target itself."""
    out = scores.copy()
    for item in set(history) - {target}:
        out[item] = -np.inf
    return out


def test_hand_case_ranks_and_metrics():
    scores = torch.tensor([
        [NINF, 0.9, 0.1, 0.5, 0.3, 0.2],      # target 1: first
        [NINF, 0.9, 0.1, 0.5, 0.3, 0.2],      # target 4: after 1 and 3 -> 3
        [NINF, 0.9, 0.1, 0.5, 0.3, 0.2],      # target 2: rank 5, outside top-3
        [NINF, 0.1, 0.2, 0.3, 0.4, 0.5],      # target 4: rank 2
    ], dtype=torch.float64)
    target = torch.tensor([1, 4, 2, 4])
    assert target_rank(scores, target, max_k=3).tolist() == [1, 3, 0, 2]
    assert target_rank(scores, target, max_k=5).tolist() == [1, 3, 5, 2]
    m = ranking_metrics(target_rank(scores, target, 3), ks=(1, 2, 3))
    # By hand: ranks 1, 3, (5), 2.
    assert m["hit@1"] == 1 / 4 and m["hit@2"] == 2 / 4 and m["hit@3"] == 3 / 4
    assert m["ndcg@1"] == pytest.approx(1 / 4)                          # rank 1 -> 1/log2(2) = 1, not 1/log2(3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(3)) / 4)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 4)
    assert m["mrr@1"] == pytest.approx(1 / 4)


def test_ties_lower_item_id_first():
    # Items 1 and 3 tie at 0.5 below item 2: target 1 is 2nd, target 3 is 3rd (not 2nd: "ties optimistic",
    # not 4th: "ties pessimistic"); a tie at the top-k boundary decides a hit.
    scores = torch.tensor([[NINF, 0.5, 0.9, 0.5, 0.1]] * 3)
    target = torch.tensor([1, 3, 4])
    assert target_rank(scores, target, 10).tolist() == [2, 3, 4]
    assert [np_rank(scores[0].numpy(), t) for t in (1, 3, 4)] == [2, 3, 4]
    assert target_rank(scores, target, 2).tolist() == [2, 0, 0]
    # All equal: rank = the item id (padding at -inf is last).
    flat = torch.zeros(1, 6)
    flat[0, 0] = NINF
    assert [target_rank(flat, torch.tensor([t]), 10).item() for t in range(1, 6)] == [1, 2, 3, 4, 5]


def test_nan_target_is_never_a_hit():
    scores = torch.tensor([[NINF, float("nan"), 0.2, 0.1]])
    assert target_rank(scores, torch.tensor([1]), 3).item() == 0
    assert target_rank(scores, torch.tensor([3]), 3).item() == 2     # a NaN elsewhere does not rank ahead


def test_padding_column_never_ranks():
    scores = torch.tensor([[NINF, 0.0, 0.0]])
    assert target_rank(scores, torch.tensor([2]), max_k=3).item() == 2
    assert target_rank(scores, torch.tensor([1]), max_k=3).item() == 1


@pytest.mark.parametrize("levels", [2, 3, 1000])
def test_random_scores_against_numpy_reference(levels):
    gen = torch.Generator().manual_seed(levels)
    scores = torch.randint(0, levels, (64, 40), generator=gen).double()
    scores[:, 0] = NINF
    target = torch.randint(1, 40, (64,), generator=gen)
    ks = (1, 5, 10, 20)
    ranks = [np_rank(scores[i].numpy(), int(target[i])) for i in range(64)]
    ours = ranking_metrics(target_rank(scores, target, max(ks)), ks)
    ref = np_metrics(ranks, ks)
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def recbole_reference(scores: torch.Tensor, target: torch.Tensor, ks) -> dict[str, float]:
    """RecBole 1.2.1's Collector.eval_batch_collect ('rec.topk') and metrics.py Hit/NDCG/MRR, written out, on
    the stable order (equal scores by item id) in place of torch.topk's unspecified one."""
    topk_idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :max(ks)]
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
    return {**{f"hit@{k}": hit[:, k - 1].mean() for k in ks}, **{f"ndcg@{k}": ndcg[:, k - 1].mean() for k in ks},
            **{f"mrr@{k}": mrr[:, k - 1].mean() for k in ks}}


@pytest.mark.parametrize("levels", [3, 1000])
def test_matches_recbole_formulas(levels):
    gen = torch.Generator().manual_seed(levels + 1)
    scores = torch.randint(0, levels, (64, 40), generator=gen).float()
    scores[:, 0] = NINF
    target = torch.randint(1, 40, (64,), generator=gen)
    ks = (5, 10, 20)
    ours = ranking_metrics(target_rank(scores, target, max(ks)), ks)
    ref = recbole_reference(scores, target, ks)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_history_masking_against_numpy():
    items = torch.tensor([3, 1, 2, 3, 4, 5])          # one user's flat sequence
    base = np.array([NINF, 0.9, 0.8, 0.7, 0.6, 0.1])
    scores = torch.tensor(np.stack([base, base, base]))
    # Example 0: history 3, 1, 2, 3 -> target 4. Example 1: history 3, 1 -> target 3 (a repeat: the target
    # stays rankable). Example 2: history 3 -> target 1.
    start, target_pos, target = torch.tensor([0, 0, 0]), torch.tensor([4, 2, 1]), torch.tensor([4, 3, 1])
    histories = [[3, 1, 2, 3], [3, 1], [3]]
    unmasked = target_rank(scores, target, 5)
    assert unmasked.tolist() == [np_rank(base, t) for t in (4, 3, 1)] == [4, 3, 1]
    masked = mask_history_(scores.clone(), items, start, target_pos, target)
    for row, (h, t) in enumerate(zip(histories, (4, 3, 1))):
        np.testing.assert_array_equal(masked[row].numpy(), np_mask(base, h, t))
    assert target_rank(masked, target, 5).tolist() == [np_rank(np_mask(base, h, t), t) for h, t in
                                                        zip(histories, (4, 3, 1))] == [1, 2, 1]
    assert ranking_metrics(target_rank(masked, target, 5), (1,))["hit@1"] == pytest.approx(2 / 3)
    assert ranking_metrics(unmasked, (1,))["hit@1"] == pytest.approx(1 / 3)
    # An example with an empty history is left alone.
    same = mask_history_(scores.clone(), items, torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3]), target)
    assert torch.equal(same, scores)
