"""Edges of ``dsl.finetune.metrics``: bad labels named exactly, counts of narrow integer types,
one-element ratios, empty counts, and the per-class markdown table byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from dsl.finetune.metrics import (
    _ratio,
    confusion,
    multi_label_metrics,
    multilabel_counts,
    per_class_markdown,
    single_label_metrics,
)


@pytest.mark.parametrize(("truth", "pred", "message"), [
    ([0, 8], [0, 0], "truth label 8 outside 0..7"),          # n itself is outside
    ([0, -1], [0, 0], "truth label -1 outside 0..7"),
    ([3, 1], [0, 9], "prediction label 9 outside 0..7"),
    ([3, 1], [-2, 7], "prediction label -2 outside 0..7"),
    ([1, 5], [0, 8], "prediction label 8 outside 0..7"),
])
def test_a_label_outside_the_classes_is_named(truth, pred, message):
    with pytest.raises(ValueError) as e:
        confusion(np.array(truth), np.array(pred))
    assert str(e.value) == message


def test_the_largest_class_and_an_ignored_truth_are_fine():
    cm = confusion(np.array([7, 255, 0]), np.array([7, 200, 0]))  # a prediction under an ignored truth
    assert cm[7, 7] == 1 and cm[0, 0] == 1 and cm.sum() == 2


def test_multilabel_counts_per_class_with_more_samples_than_classes():
    truth = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
    pred = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]])
    counts = multilabel_counts(truth, pred)
    assert counts.dtype == np.int64
    #                     TP FP FN TN per class
    assert counts.tolist() == [[2, 0, 1, 2], [1, 1, 1, 2], [2, 0, 1, 2]]
    valid = [1, 0, 1, 1, 0]  # an int mask is a mask, not row indices
    assert multilabel_counts(truth, pred, valid).tolist() == [[1, 0, 1, 1], [0, 1, 0, 2], [1, 0, 1, 1]]


@pytest.mark.parametrize(("truth", "pred"), [(np.zeros(3), np.zeros(3)), (np.zeros((2, 3)), np.zeros((3, 3))),
                                             (np.zeros((1, 2, 3)), np.zeros((1, 2, 3)))])
def test_multilabel_counts_needs_two_equal_2d_arrays(truth, pred):
    with pytest.raises(ValueError) as e:
        multilabel_counts(truth, pred)
    assert str(e.value) == f"truth {truth.shape} and predictions {pred.shape} must be the same [N, classes]"


def test_a_single_right_prediction_has_precision_and_recall_one():
    out = single_label_metrics(confusion(np.array([3]), np.array([3])))
    row = out["per_class"][3]
    assert (row["precision"], row["recall"], row["f1"]) == (1.0, 1.0, 1.0)
    assert out["metrics"] == {"average_accuracy": 1.0, "overall_accuracy": 1.0, "macro_f1": 1.0, "micro_f1": 1.0}


def test_a_class_predicted_once_but_never_true_counts_in_macro_f1():
    out = single_label_metrics(confusion(np.array([0, 0]), np.array([0, 4])))
    assert out["metrics"]["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_counts_of_a_narrow_integer_type_do_not_overflow():
    cm = np.zeros((8, 8), dtype=np.uint8)
    cm[0, 0], cm[1, 0], cm[1, 1] = 200, 100, 250  # column 0 and row 1 sum past 255
    out = single_label_metrics(cm)
    assert out["per_class"][0]["predicted"] == 300 and out["per_class"][1]["support"] == 350
    assert out["per_class"][1]["f1"] == pytest.approx(2 * 250 / (2 * 250 + 0 + 100))  # 2 * TP past 255
    assert out["metrics"]["overall_accuracy"] == pytest.approx(450 / 550)
    counts = np.zeros((8, 4), dtype=np.uint8)
    counts[0] = [200, 100, 0, 0]  # TP + FP = 300
    out = multi_label_metrics(counts)
    assert out["per_class"][0]["precision"] == pytest.approx(2 / 3)


def test_no_decision_at_all_scores_zero():
    out = multi_label_metrics(np.zeros((8, 4), dtype=np.int64))
    assert out["metrics"] == {"average_accuracy": 0.0, "overall_accuracy": 0.0, "macro_f1": 0.0, "micro_f1": 0.0}


def test_per_class_markdown_byte_for_byte():
    table = single_label_metrics(confusion(np.array([0, 0, 1]), np.array([0, 1, 1])))["per_class"][:2]
    assert per_class_markdown(table) == (
        "| class | support | predicted | precision | recall | F1 |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| Forest | 2 | 1 | 1.0000 | 0.5000 | 0.6667 |\n"
        "| Shrubland | 1 | 2 | 0.5000 | 1.0000 | 0.6667 |\n"
    )


def test_a_ratio_over_zero_is_zero_whatever_the_memory_held():
    for n in (1, 8, 64, 1000):
        garbage = np.full(n, 7.0)  # freed just before: numpy hands its memory out again
        del garbage
        assert _ratio(np.arange(1, n + 1), np.zeros(n)).tolist() == [0.0] * n
    assert _ratio(np.array([1, 3]), np.array([2, 0])).tolist() == [0.5, 0.0]
