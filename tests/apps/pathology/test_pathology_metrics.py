"""Metrics against scikit-survival / scikit-learn, and the survival loss against a float64 transcription."""

import numpy as np
import pytest
import torch

from mambakit.apps.pathology.losses import NLLSurvLoss, hazards_and_survival, nll_surv_loss
from mambakit.apps.pathology.metrics import (classification_metrics, concordance_index_censored, multiclass_auc,
                                             survival_risk)


@pytest.mark.parametrize("seed", range(6))
def test_c_index_matches_scikit_survival(seed):
    sksurv = pytest.importorskip("sksurv.metrics")
    rng = np.random.default_rng(seed)
    n = 60
    time = np.round(rng.exponential(20, n), 0 if seed % 2 else 2)      # odd seeds: many tied times
    event = rng.random(n) < 0.6
    risk = np.round(rng.normal(size=n), 1 if seed % 3 == 0 else 6)      # some seeds: tied risks
    ours = concordance_index_censored(event, time, risk)
    theirs = sksurv.concordance_index_censored(event, time, risk, tied_tol=1e-8)[0]
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_c_index_edge_cases():
    assert concordance_index_censored([1, 1], [1.0, 2.0], [2.0, 1.0]) == 1.0      # earlier death, higher risk
    assert concordance_index_censored([1, 1], [1.0, 2.0], [1.0, 2.0]) == 0.0
    assert concordance_index_censored([1, 1], [1.0, 2.0], [1.0, 1.0]) == 0.5
    assert np.isnan(concordance_index_censored([0, 0], [1.0, 2.0], [1.0, 2.0]))   # nothing comparable
    with pytest.raises(ValueError, match="one length"):
        concordance_index_censored([1], [1.0, 2.0], [1.0, 2.0])


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    p1 = np.clip(labels * 0.3 + rng.random(50) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(labels, probs)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, p1))
    preds = probs.argmax(1)
    assert m["acc"] == pytest.approx((preds == labels).mean())
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, preds))
    assert m["f1"] == pytest.approx(f1_score(labels, preds, average="macro"))


def test_multiclass_auc_is_mean_one_vs_rest_over_present_classes():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 3], 80)             # class 2 absent, as in a small split
    probs = rng.dirichlet(np.ones(4), 80)
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in (0, 1, 3)])
    assert multiclass_auc(labels, probs) == pytest.approx(expected)
    assert np.isnan(multiclass_auc(np.zeros(5, int), probs[:5]))


def _reference_nll(logits, label, c, alpha, eps=1e-7):
    """Per-patient likelihood written from the model's definition (float64, loops)."""
    total = 0.0
    for row, y, cens in zip(logits.tolist(), label.tolist(), c.tolist()):
        h = [1 / (1 + np.exp(-v)) for v in row]
        s = np.cumprod([1 - v for v in h])
        s_prev = 1.0 if y == 0 else s[y - 1]                     # S(y-1), with S(-1) = 1
        unc = -(1 - cens) * (np.log(max(s_prev, eps)) + np.log(max(h[y], eps)))
        cen = -cens * np.log(max(s[y], eps))
        total += (1 - alpha) * (unc + cen) + alpha * unc
    return total / len(label)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_nll_surv_loss_matches_definition_and_gradcheck(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64) * 2
    label = torch.tensor([0, 1, 2, 3, 3, 0, 2])
    c = torch.tensor([0, 1, 0, 1, 0, 1, 1], dtype=torch.float64)
    loss = NLLSurvLoss(alpha)(logits, label, c)
    assert loss.item() == pytest.approx(_reference_nll(logits, label, c, alpha), rel=1e-12)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: nll_surv_loss(*hazards_and_survival(t), label, c, alpha), (x,))


def test_nll_surv_loss_errors_and_risk():
    h, s = hazards_and_survival(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="bins must be in"):
        nll_surv_loss(h, s, torch.tensor([0, 4]), torch.zeros(2))
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    risk = survival_risk(logits)
    assert risk[1] > risk[0]                                  # a high first-bin hazard means high risk
    torch.testing.assert_close(risk[0], -torch.tensor(0.5 + 0.25 + 0.125 + 0.0625))
