"""Point-cloud metrics against hand-computed cases, a plain-loop ShapeNetPart evaluation and scikit-learn.

The hand cases are chosen so the usual mistakes change the number: micro instead of class-mean accuracy, an
absent class averaged in, a transposed confusion matrix, an unrestricted argmax, parts of other categories
averaged in, an absent part scored 0 instead of 1, class mIoU as a mean over shapes."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from mambakit.apps.pointcloud.metrics import (PartSegMeter, classification_metrics, confusion_matrix,
                                              mean_class_accuracy, overall_accuracy, part_mask,
                                              part_segmentation_metrics, per_class_accuracy,
                                              restricted_predictions, shape_ious)

# ------------------------------------------------------------------------------------------ classification

# 8 samples, 4 classes; class 3 is predicted once but never a target; class 0 dominates.
TARGETS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
PREDS = torch.tensor([0, 0, 0, 1, 1, 3, 2, 0])


def test_confusion_matrix_rows_are_true_classes_as_scikit_learn():
    cm = confusion_matrix(PREDS, TARGETS, 4)
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(TARGETS, PREDS, labels=range(4)))
    assert cm[0, 1] == 1 and cm[1, 0] == 0           # true 0 predicted 1 once, never the reverse
    assert cm.dtype == torch.int64


def test_overall_and_mean_class_accuracy_by_hand_and_against_scikit_learn():
    assert overall_accuracy(PREDS, TARGETS) == pytest.approx(5 / 8)
    cm = confusion_matrix(PREDS, TARGETS, 4)
    acc = per_class_accuracy(cm)
    np.testing.assert_allclose(acc[:3].numpy(), [3 / 4, 1 / 2, 1 / 2])
    assert math.isnan(acc[3])                          # class 3 has no samples: no accuracy, not 0
    assert mean_class_accuracy(cm) == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    with pytest.warns(UserWarning):                    # sklearn warns about the predicted-only class 3
        expected = skm.balanced_accuracy_score(TARGETS, PREDS)
    assert mean_class_accuracy(cm) == pytest.approx(expected)


def test_classification_metrics_on_random_logits_match_scikit_learn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g)
    targets = torch.randint(0, 7, (200,), generator=g)
    out = classification_metrics(logits, targets)
    preds = logits.argmax(1).numpy()
    assert out["oa"] == pytest.approx(skm.accuracy_score(targets, preds))
    assert out["macc"] == pytest.approx(skm.balanced_accuracy_score(targets, preds))
    probs = torch.softmax(logits.double(), 1).numpy()
    assert out["loss"] == pytest.approx(skm.log_loss(targets, probs, labels=range(7)), rel=1e-5)


def test_classification_errors_name_the_shapes_and_labels():
    with pytest.raises(ValueError, match=r"labels in \[0, 5\], expected \[0, 3\]"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match=r"\(N, C\) and \(N,\)"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="square"):
        per_class_accuracy(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ part segmentation

# Two categories: 0 has parts {0, 1}, 1 has parts {2, 3, 4}.
PARTS = [[0, 1], [2, 3, 4]]
SEG_TARGETS = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3], [2, 3, 3, 3]])
SEG_PREDS = torch.tensor([[0, 1, 1, 1], [2, 2, 3, 3], [3, 3, 3, 3]])
SEG_CATS = torch.tensor([0, 1, 1])
# shape 0: part 0 IoU 1/2, part 1 IoU 2/3               -> 7/12
# shape 1: parts 2, 3 exact, part 4 absent in both (1)   -> 1
# shape 2: part 2 IoU 0, part 3 IoU 3/4, part 4 absent   -> 7/12
SHAPE_IOUS = [7 / 12, 1.0, 7 / 12]


def test_shape_ious_by_hand():
    ious = shape_ious(SEG_PREDS, SEG_TARGETS, SEG_CATS, PARTS)
    np.testing.assert_allclose(ious.numpy(), SHAPE_IOUS)
    assert ious.dtype == torch.float64


def test_instance_and_class_miou_by_hand():
    out = part_segmentation_metrics(SEG_PREDS, SEG_TARGETS, SEG_CATS, PARTS, category_names=["mug", "lamp"])
    assert out["instance_miou"] == pytest.approx((7 / 12 + 1 + 7 / 12) / 3)                 # 13/18
    assert out["miou/mug"] == pytest.approx(7 / 12)
    assert out["miou/lamp"] == pytest.approx((1 + 7 / 12) / 2)
    assert out["class_miou"] == pytest.approx((7 / 12 + (1 + 7 / 12) / 2) / 2)             # 11/16, not 13/18
    assert out["acc"] == pytest.approx(10 / 12)                                              # 3 + 4 + 3 of 12


def test_predictions_are_restricted_to_the_category_parts():
    # The global argmax of every point is part 4 (category 1's), which a mug (category 0) cannot have.
    logits = torch.full((1, 3, 5), -1.0)
    logits[..., 4] = 9.0
    logits[0, 0, 1], logits[0, 1, 0], logits[0, 2, 1] = 2.0, 0.5, 0.0
    preds = restricted_predictions(logits, torch.tensor([0]), PARTS)
    assert preds.tolist() == [[1, 0, 1]]
    out = part_segmentation_metrics(logits, torch.tensor([[1, 0, 0]]), torch.tensor([0]), PARTS)
    assert out["instance_miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)   # part 0: 1/2, part 1: 1/2
    unrestricted = part_segmentation_metrics(logits.argmax(-1), torch.tensor([[1, 0, 0]]), torch.tensor([0]),
                                             PARTS)
    assert unrestricted["instance_miou"] == 0.0                          # given predictions are used as they are


def _loop_reference(logits, targets, categories, parts_of_category):
    """PointNet's ShapeNetPart evaluation, written as plainly as possible (numpy, float64)."""
    logits, targets, categories = logits.double().numpy(), targets.numpy(), categories.numpy()
    shape_scores, by_category = [], {}
    for b in range(len(targets)):
        parts = parts_of_category[categories[b]]
        pred = np.array(parts)[np.argmax(logits[b][:, parts], axis=1)]
        ious = []
        for p in parts:
            inter = np.sum((pred == p) & (targets[b] == p))
            union = np.sum((pred == p) | (targets[b] == p))
            ious.append(1.0 if union == 0 else inter / union)
        shape_scores.append(np.mean(ious))
        by_category.setdefault(categories[b], []).append(np.mean(ious))
    return np.mean(shape_scores), np.mean([np.mean(v) for v in by_category.values()]), by_category


def test_miou_matches_a_plain_loop_on_random_inputs():
    g = torch.Generator().manual_seed(1)
    parts = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]]
    B, N = 23, 40
    categories = torch.randint(0, 3, (B,), generator=g)                  # category 3 never occurs
    targets = torch.stack([torch.tensor(parts[c])[torch.randint(0, len(parts[c]), (N,), generator=g)]
                           for c in categories.tolist()])
    targets[0, :] = parts[categories[0]][0]                              # some parts absent from the truth
    logits = torch.randn(B, N, 10, generator=g)
    out = part_segmentation_metrics(logits, targets, categories, parts)
    instance, cls, by_category = _loop_reference(logits, targets, categories, parts)
    assert out["instance_miou"] == pytest.approx(instance, abs=1e-12)
    assert out["class_miou"] == pytest.approx(cls, abs=1e-12)
    for c, scores in by_category.items():
        assert out[f"miou/{c}"] == pytest.approx(np.mean(scores), abs=1e-12)
    assert "miou/3" not in out                                           # absent categories are not averaged

    meter = PartSegMeter(parts)                                          # batch by batch: the same numbers
    for start in range(0, B, 5):
        meter.update(logits[start:start + 5], targets[start:start + 5], categories[start:start + 5])
    streamed = meter.compute()
    assert streamed.keys() == out.keys()
    for key in out:
        assert streamed[key] == pytest.approx(out[key], abs=1e-12)


def test_segmentation_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"shape 1 \(category 0\) has target part labels \[3\]"):
        shape_ious(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 1], [3, 0]]), torch.tensor([0, 0]),
                   PARTS)
    with pytest.raises(ValueError, match=r"categories hold values in \[0, 2\], expected \[0, 1\]"):
        restricted_predictions(torch.zeros(2, 3, 5), torch.tensor([0, 2]), PARTS)
    with pytest.raises(ValueError, match=r"parts_of_category\[1\] has part ids \[7\] outside \[0, 4\]"):
        part_mask([[0, 1], [2, 7]], 5)
    with pytest.raises(ValueError, match=r"parts_of_category\[0\] is empty"):
        part_mask([[], [1]], 2)
    with pytest.raises(ValueError, match=r"categories must be \(B,\) = \(3,\)"):
        shape_ious(SEG_PREDS, SEG_TARGETS, torch.tensor([0, 1]), PARTS)
    with pytest.raises(ValueError, match="category_names has 1 names for 2 categories"):
        part_segmentation_metrics(SEG_PREDS, SEG_TARGETS, SEG_CATS, PARTS, category_names=["mug"])
