"""Absolute checks of what the app reports (issue 27): the task's metrics against scikit-learn /
scikit-survival / numpy on hand-made outputs, and every inference path (bag scores behind heatmaps and
the cohort's attention report, features read from .h5 instead of .pt) against the engine's evaluation loop
on the same bags, twice in a row."""

import numpy as np
import pytest
import torch

from mambakit.apps.pathology.task import MILTask

from test_pathology_app import _recipe, mil_data  # noqa: F401  (fixture)


# --------------------------------------------------------------------------------------------------
# the task's metrics on hand-made outputs

def test_subtyping_metrics_of_the_task_match_sklearn(mil_data):  # noqa: F811
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    task = MILTask(_recipe(mil_data))
    # 3 classes; class 2 is never predicted; ties in class-1 probabilities
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    probs = np.array([[.7, .2, .1], [.3, .5, .2], [.2, .5, .3], [.1, .8, .1], [.4, .5, .1],
                      [.5, .3, .2], [.2, .45, .35], [.6, .3, .1]])
    out = task.compute_metrics({"loss": torch.tensor([0.5, 1.5]), "prob": torch.tensor(probs),
                                "label": torch.tensor(labels)}, "val")
    preds = probs.argmax(1)
    assert out["loss"] == pytest.approx(1.0)
    assert out["acc"] == pytest.approx(np.mean(preds == labels)) and out["acc"] == pytest.approx(5 / 8)
    assert out["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, preds))
    assert out["balanced_acc"] == pytest.approx((2 / 3 + 3 / 3 + 0 / 2) / 3)          # by hand
    assert out["f1"] == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0))
    ovr = [roc_auc_score(labels == c, probs[:, c]) for c in range(3)]
    assert out["auc"] == pytest.approx(np.mean(ovr))                                   # macro one-vs-rest
    weighted = np.average(ovr, weights=np.bincount(labels))
    assert abs(np.mean(ovr) - weighted) > 1e-3                                         # the case tells them apart
    # binary: the AUC of the positive class's column
    lab2 = np.array([0, 1, 1, 0, 1])
    p1 = np.array([0.2, 0.9, 0.4, 0.4, 0.6])
    out2 = task.compute_metrics({"loss": torch.zeros(5), "prob": torch.tensor(np.stack([1 - p1, p1], 1)),
                                 "label": torch.tensor(lab2)}, "val")
    assert out2["auc"] == pytest.approx(roc_auc_score(lab2, p1)) and out2["auc"] == pytest.approx(5.5 / 6)


def _pairs_c_index(event, time, risk):
    """Harrell's C by enumerating pairs (numpy by hand): i comparable with j when t_i < t_j and i had the
    event, or t_i == t_j with i an event and j censored; tied risks count one half."""
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_survival_c_index_of_the_task_uses_one_minus_censorship_as_the_event(mil_data):  # noqa: F811
    from sksurv.metrics import concordance_index_censored

    task = MILTask(_recipe(mil_data, task="survival"))
    censorship = np.array([0, 1, 0, 0, 1, 0, 1])           # MambaMIL's column: 1 = censored
    time = np.array([5.0, 6.0, 6.0, 9.0, 2.0, 12.0, 12.0])  # a tie between an event and a censoring
    risk = np.array([3.0, 0.5, 2.0, 2.0, 1.0, -1.0, 0.0])    # tied risks too
    out = task.compute_metrics({"loss": torch.zeros(7), "risk": torch.tensor(risk), "time": torch.tensor(time),
                                "censorship": torch.tensor(censorship), "label": torch.zeros(7, dtype=torch.long)},
                               "val")
    event = censorship == 0
    expected = concordance_index_censored(event, time, risk)[0]
    assert out["c_index"] == pytest.approx(expected, abs=1e-12)
    assert out["c_index"] == pytest.approx(_pairs_c_index(event, time, risk), abs=1e-12)
    inverted = concordance_index_censored(~event, time, risk)[0]
    assert abs(expected - inverted) > 0.05                  # the case catches an inverted event indicator


def test_survival_eval_step_risk_is_minus_the_sum_of_survival(mil_data):  # noqa: F811
    task = MILTask(_recipe(mil_data, task="survival"))
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0], [-2.0, -2.0, -2.0, -2.0]], dtype=torch.float64)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    batch = {"features": torch.zeros(2, 3, 16), "label": torch.tensor([1, 3]), "censorship": torch.tensor([0., 1.]),
             "time": torch.tensor([4.0, 30.0]), "index": torch.tensor([0, 1])}
    out = task.eval_step(Fixed(), batch)
    h = 1 / (1 + np.exp(-logits.numpy()))
    expected = -np.cumprod(1 - h, axis=1).sum(1)
    np.testing.assert_allclose(out["risk"].numpy(), expected, rtol=1e-6)     # logits are read in float32
    assert out["risk"][1] < out["risk"][0]                  # low hazards everywhere: lower risk
    np.testing.assert_array_equal(out["censorship"].numpy(), [0.0, 1.0])


# --------------------------------------------------------------------------------------------------
# inference paths == the evaluation loop

def _eval_outputs(task, run, split):
    """The engine's evaluation loop (`mambakit.engine.trainer.evaluate`): its metrics and the per-bag outputs
    it computed them from."""
    from mambakit.engine.trainer import evaluate

    seen = {}
    original = task.compute_metrics

    def recording(outputs, split_name):
        seen.update({k: v.clone() for k, v in outputs.items()})
        return original(outputs, split_name)

    task.compute_metrics = recording
    metrics = evaluate(task, run, split=split)
    order = torch.argsort(seen["index"])
    return metrics, {k: v[order] for k, v in seen.items()}


def _write_h5(bag, folder):
    """The bag's features as extract writes them (h5_files/<slide>.h5 with coords), next to pt_files/."""
    from mambakit.apps.pathology.data import load_features
    from mambakit.apps.pathology.features import _write_features_h5

    feats = load_features(bag.paths[0])
    coords = np.stack([np.arange(len(feats)) * 256, np.zeros(len(feats))], 1).astype(np.int64)
    (folder / "h5_files").mkdir(exist_ok=True)
    path = folder / "h5_files" / f"{bag.slide_ids[0]}.h5"
    _write_features_h5(path, feats.numpy(), coords, {"patch_size": 256, "patch_level": 0}, {"backbone": "test"})
    return path


@pytest.mark.parametrize("model", ["{name: mamba_mil, in_dim: 16, dim: 32, d_state: 4, layer: 1}",
                                   "{name: abmil, in_dim: 16, gated: true, dropout: 0.25}",
                                   "{name: mean_mil, in_dim: 16}"])
def test_bag_scores_equal_the_evaluation_loop_twice(mil_data, tmp_path, model):  # noqa: F811
    from sklearn.metrics import roc_auc_score

    from mambakit.apps.pathology.data import load_features
    from mambakit.apps.pathology.inference import bag_scores, model_from_checkpoint
    from mambakit.engine.trainer import Trainer

    config = _recipe(mil_data, f"model={model}", "train.epochs=1")
    Trainer(MILTask(config)).fit(tmp_path / "run")
    task = MILTask(config)
    metrics, outputs = _eval_outputs(task, tmp_path / "run", "test")
    net, _, classes = model_from_checkpoint(tmp_path / "run")
    assert classes == ["normal", "tumour"]
    bags = task.splits["test"]
    probs = []
    for bag in bags:
        h5 = _write_h5(bag, mil_data)
        feats_h5 = load_features(h5, with_coords=True)[0]
        torch.testing.assert_close(feats_h5, load_features(bag.paths[0]), rtol=0, atol=0)   # .h5 == .pt
        first, scores1 = bag_scores(net, feats_h5)
        second, scores2 = bag_scores(net, feats_h5)
        torch.testing.assert_close(first, second, rtol=0, atol=0)                          # deterministic
        np.testing.assert_array_equal(scores1, scores2)
        assert scores1.shape == (len(feats_h5),)
        if net.scores_are_attention:
            assert scores1.min() >= 0 and scores1.sum() == pytest.approx(1.0, abs=1e-5)
        probs.append(torch.softmax(first.double(), dim=1)[0])
    probs = torch.stack(probs)
    torch.testing.assert_close(probs, outputs["prob"].double(), rtol=1e-5, atol=1e-6)
    labels = np.array([b.label for b in bags])
    np.testing.assert_array_equal(outputs["label"].numpy(), labels)
    # the loop's reported metrics against sklearn / numpy on the inference path's probabilities
    assert metrics["test/auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1].numpy()), abs=1e-9)
    assert metrics["test/acc"] == pytest.approx(np.mean(probs.argmax(1).numpy() == labels))


def test_survival_risk_from_a_checkpoint_equals_the_evaluation_loop(mil_data, tmp_path):  # noqa: F811
    from sksurv.metrics import concordance_index_censored

    from mambakit.apps.pathology.data import load_features
    from mambakit.apps.pathology.inference import bag_scores, model_from_checkpoint
    from mambakit.engine.trainer import Trainer

    config = _recipe(mil_data, "model={name: abmil, in_dim: 16}", "train.epochs=1", task="survival")
    Trainer(MILTask(config)).fit(tmp_path / "run")
    task = MILTask(config)
    metrics, outputs = _eval_outputs(task, tmp_path / "run", "val")
    net, _, _ = model_from_checkpoint(tmp_path / "run")
    risks = []
    for bag in task.splits["val"]:
        logits, _ = bag_scores(net, torch.cat([load_features(p) for p in bag.paths]))
        h = torch.sigmoid(logits.double())[0]
        risks.append(float(-torch.cumprod(1 - h, 0).sum()))
    np.testing.assert_allclose(risks, outputs["risk"].double().numpy(), rtol=1e-6)
    event = np.array([not b.censorship for b in task.splits["val"]])
    time = np.array([b.time for b in task.splits["val"]])
    expected = concordance_index_censored(event, time, np.array(risks))[0]
    assert metrics["val/c_index"] == pytest.approx(expected, abs=1e-9)
