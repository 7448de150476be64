"""Every metric the vision app reports, against scikit-learn on small hand-made cases where a plausible bug
(micro instead of macro averaging, absent classes counted, a transposed confusion matrix, top-k off by one,
a summed or smoothed loss) changes the number."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from mambakit.apps.vision.metrics import classification_metrics, confusion_matrix, macro_f1, topk_accuracy

# 7 samples, 5 classes. Class 3 never occurs as a target but is predicted once; class 4 never occurs at all;
# the classes are unbalanced (three 0s), so micro and macro averages differ.
LOGITS = torch.tensor([
    [4.0, 1.0, 0.5, 0.0, -1.0],    # true 0, predicted 0
    [3.0, 2.5, 0.0, 0.1, -1.0],    # true 0, predicted 0
    [0.2, 3.0, 2.9, 0.0, -1.0],    # true 0, predicted 1 (0 is only third: outside top-2, inside top-3)
    [0.0, 2.0, 1.5, 0.0, -1.0],    # true 1, predicted 1
    [1.0, 0.5, 2.0, 0.0, -1.0],    # true 1, predicted 2 (1 is third)
    [0.0, 0.1, 0.2, 3.0, -1.0],    # true 2, predicted 3 (2 is second)
    [0.0, 0.0, 5.0, 1.0, -1.0],    # true 2, predicted 2
])
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2])
PRED = LOGITS.argmax(1).numpy()
PROBS = torch.softmax(LOGITS.double(), 1).numpy()


def test_topk_accuracy_against_scikit_learn():
    labels = list(range(5))
    for k in (1, 2, 3, 4):
        expected = skm.top_k_accuracy_score(TARGET.numpy(), PROBS, k=k, labels=labels)
        assert topk_accuracy(LOGITS, TARGET, k) == pytest.approx(expected, abs=1e-7)
    assert topk_accuracy(LOGITS, TARGET, 2) == pytest.approx(5 / 7)      # by hand: rows 2 and 4 miss
    assert topk_accuracy(LOGITS, TARGET, 3) == pytest.approx(1.0)
    assert topk_accuracy(LOGITS, TARGET, 9) == 1.0                       # k beyond the classes: all of them


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(torch.from_numpy(PRED), TARGET, 5)
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(TARGET.numpy(), PRED, labels=range(5)))
    assert cm[2, 3] == 1 and cm[3, 2] == 0                              # true 2 predicted 3, not the reverse


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_averages_recall_over_the_classes_present():
    m = classification_metrics(LOGITS, TARGET, topk=2)
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(TARGET.numpy(), PRED), abs=1e-7)
    assert m["balanced_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)  # not / 5 (absent 3, 4), not 4 / 7
    assert m["acc"] == pytest.approx(skm.accuracy_score(TARGET.numpy(), PRED)) == pytest.approx(4 / 7)


def test_macro_f1_against_scikit_learn():
    m = classification_metrics(LOGITS, TARGET, topk=2)
    expected = skm.f1_score(TARGET.numpy(), PRED, average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(expected, abs=1e-7)
    # by hand: class 0: P 2/2 R 2/3 -> 0.8; 1: P 1/2 R 1/2 -> 0.5; 2: P 1/2 R 1/2 -> 0.5; 3 (predicted only): 0
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.5 + 0.0) / 4)
    assert m["macro_f1"] != pytest.approx(skm.f1_score(TARGET.numpy(), PRED, average="micro"))
    assert macro_f1(torch.eye(3) * 4) == 1.0


def test_loss_is_the_mean_cross_entropy_without_smoothing():
    m = classification_metrics(LOGITS, TARGET, topk=2)
    assert m["loss"] == pytest.approx(skm.log_loss(TARGET.numpy(), PROBS, labels=range(5)), rel=1e-6)


def test_top_k_is_reported_only_with_more_classes_than_k():
    assert "acc_top2" in classification_metrics(LOGITS, TARGET, topk=2)
    assert classification_metrics(LOGITS, TARGET, topk=2)["acc_top2"] == pytest.approx(5 / 7)
    assert "acc_top5" not in classification_metrics(LOGITS, TARGET, topk=5)   # 5 classes: top-5 is always 1


def test_task_metrics_and_confusion_come_from_the_whole_split():
    from mambakit.apps.vision.config import DataConfig, VisionRecipe
    from mambakit.apps.vision.task import VisionTask

    task = VisionTask(VisionRecipe(data=DataConfig(source="mnist5k", class_names=[str(i) for i in range(5)])))
    m = task.compute_metrics({"logits": LOGITS, "target": TARGET}, "test")
    np.testing.assert_array_equal(task.confusion["test"].numpy(),
                                  skm.confusion_matrix(TARGET.numpy(), PRED, labels=range(5)))
    assert m["acc"] == pytest.approx(4 / 7)
    assert set(m) == {"loss", "acc", "balanced_acc", "macro_f1"}         # eval.topk 5 with 5 classes: no top-5
