"""Fine-tuning metrics against hand-computed examples; the ignore class never counts."""

from __future__ import annotations

import numpy as np
import pytest

from dsl.finetune.metrics import (
    confusion,
    multi_label_metrics,
    multilabel_counts,
    per_class_markdown,
    single_label_metrics,
)


def test_single_label_by_hand():
    # counted: 0->0, 0->1, 1->1, 1->1, 2->0; the two 255 rows (one "predicting" class 3) never count
    truth = np.array([0, 0, 1, 1, 2, 255, 255])
    pred = np.array([0, 1, 1, 1, 0, 3, 0])
    cm = confusion(truth, pred)
    assert cm.sum() == 5 and cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 2 and cm[2, 0] == 1
    out = single_label_metrics(cm)
    m = out["metrics"]
    assert m["average_accuracy"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)  # recall of classes in the truth
    assert m["overall_accuracy"] == pytest.approx(3 / 5)
    # F1: class 0 P=1/2 R=1/2 -> 1/2; class 1 P=2/3 R=1 -> 4/5; class 2 -> 0; class 3 is never scored
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert m["micro_f1"] == pytest.approx(3 / 5)
    rows = {r["class"]: r for r in out["per_class"]}
    assert rows["Forest"] == {"class": "Forest", "support": 2, "predicted": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert rows["Shrubland"]["precision"] == pytest.approx(2 / 3) and rows["Shrubland"]["f1"] == pytest.approx(0.8)
    assert rows["Wetlands"]["support"] == 0 and rows["Wetlands"]["predicted"] == 0
    assert "| Grassland | 1 | 0 | 0.0000 | 0.0000 | 0.0000 |" in per_class_markdown(out["per_class"])


def test_counts_add_up_across_ranks():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 8, 100), rng.integers(0, 8, 100)
    truth[::7] = 255
    assert np.array_equal(confusion(truth[:40], pred[:40]) + confusion(truth[40:], pred[40:]), confusion(truth, pred))
    m = single_label_metrics(confusion(truth, pred))["metrics"]
    valid = truth != 255
    assert m["overall_accuracy"] == pytest.approx((truth[valid] == pred[valid]).mean())


def test_all_ignored_and_bad_labels():
    m = single_label_metrics(confusion(np.array([255, 255]), np.array([1, 2])))["metrics"]
    assert m == {"average_accuracy": 0.0, "overall_accuracy": 0.0, "macro_f1": 0.0, "micro_f1": 0.0}
    with pytest.raises(ValueError, match="prediction label 9 outside 0..7"):
        confusion(np.array([1]), np.array([9]))
    with pytest.raises(ValueError, match="truth has 2 labels, predictions 1"):
        confusion(np.array([1, 2]), np.array([1]))


def test_multi_label_by_hand():
    truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 1, 1]])
    pred = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0], [0, 0, 0]])
    valid = np.array([True, True, True, False])  # the last sample had no valid pixel: never counted
    counts = multilabel_counts(truth, pred, valid)
    assert counts.tolist() == [[1, 0, 1, 1], [2, 0, 0, 1], [0, 1, 1, 1]]  # TP FP FN TN per class
    m = multi_label_metrics(counts)["metrics"]
    assert m["average_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["overall_accuracy"] == pytest.approx(6 / 9)  # right (sample, class) decisions
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))


def test_macro_f1_counts_a_class_that_is_only_predicted():
    # class 2 never occurs in the truth but is predicted once: its F1 is 0 and it counts
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    out = single_label_metrics(confusion(truth, pred))
    # class 0: P=1 R=1/2 -> 2/3; class 1: P=R=1 -> 1; class 2: P=0 (1 FP), support 0 -> 0
    assert out["metrics"]["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert out["metrics"]["average_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # recall: truth classes only
    rows = {r["class"]: r for r in out["per_class"]}
    assert rows["Grassland"] == {"class": "Grassland", "support": 0, "predicted": 1, "precision": 0.0,
                                 "recall": 0.0, "f1": 0.0}
    # multi-label: class 2 is absent from every truth row but predicted once
    truth = np.array([[1, 0, 0], [0, 1, 0]])
    pred = np.array([[1, 0, 1], [0, 1, 0]])
    m = multi_label_metrics(multilabel_counts(truth, pred))["metrics"]
    assert m["macro_f1"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["average_accuracy"] == pytest.approx(1.0)
