"""Classification metrics from counts, in plain numpy.

Everything is computed from additive counts (a confusion matrix, per-class TP/FP/FN), so every
rank counts its share of the test split and one all-reduce (a sum) gives the exact totals.

Single-label (DFC2020 classes 0..7, 255 = ignore):
  * ``average_accuracy``: mean per-class recall over the classes present in the truth.
  * ``overall_accuracy``: correct / counted samples.
  * ``macro_f1``: mean per-class F1 over the classes present in the truth or the predictions
    (a class with neither has no defined F1 and is left out).
  * ``micro_f1``: F1 of the pooled counts (equal to the overall accuracy for one label per sample).
A sample whose truth is the ignore value is never counted.

Multi-label (multi-hot truth, predictions are ``sigmoid >= 0.5``): per-class TP/FP/FN/TN;
``average_accuracy`` is the mean per-class recall (classes present), ``overall_accuracy`` the
fraction of (sample, class) decisions that are right, F1s as above. Samples without any valid
pixel (single-label truth 255) are left out.
"""

from __future__ import annotations

import numpy as np

from dsl.contracts.shard_format import DFC_CLASSES, IGNORE

N_CLASSES = len(DFC_CLASSES)
METRICS = ("average_accuracy", "overall_accuracy", "macro_f1", "micro_f1")


def confusion(truth: np.ndarray, pred: np.ndarray, n: int = N_CLASSES) -> np.ndarray:
    """int64 [n, n] counts, rows = truth, columns = prediction; truth == 255 is skipped.

    Raises:
        ValueError: Shapes differ, or a label is outside 0..n-1 (other than the ignored truth).
    """
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    if truth.shape != pred.shape:
        raise ValueError(f"truth has {truth.size} labels, predictions {pred.size}")
    keep = truth != IGNORE
    truth, pred = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    for name, a in (("truth", truth), ("prediction", pred)):
        if a.size and (a.min() < 0 or a.max() >= n):
            raise ValueError(f"{name} label {a.min() if a.min() < 0 else a.max()} outside 0..{n - 1}")
    return np.bincount(truth * n + pred, minlength=n * n).reshape(n, n)


def multilabel_counts(truth: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """int64 [n, 4] per-class (TP, FP, FN, TN) of multi-hot ``truth`` and ``pred`` [N, n].

    Args:
        truth: Multi-hot targets [N, n]; any nonzero value counts as present.
        pred: Multi-hot predictions [N, n], same shape as ``truth``.
        valid: bool [N], samples to count (None: all).

    Raises:
        ValueError: ``truth`` and ``pred`` differ in shape or are not 2-D.
    """
    truth, pred = np.asarray(truth).astype(bool), np.asarray(pred).astype(bool)
    if truth.shape != pred.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and predictions {pred.shape} must be the same [N, classes]")
    if valid is not None:
        truth, pred = truth[np.asarray(valid, dtype=bool)], pred[np.asarray(valid, dtype=bool)]
    return np.stack([(truth & pred).sum(0), (~truth & pred).sum(0), (truth & ~pred).sum(0),
                     (~truth & ~pred).sum(0)], axis=1).astype(np.int64)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Divide elementwise as float64: a / b, and 0 where b is 0 (sklearn's zero_division=0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _summary(tp, fp, fn, accuracy: float) -> dict:
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    support, predicted = tp + fn, tp + fp
    present = support > 0
    scored = present | (predicted > 0)
    tps, fps, fns = tp.sum(), fp.sum(), fn.sum()
    metrics = {
        "average_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "overall_accuracy": float(accuracy),
        "macro_f1": float(f1[scored].mean()) if scored.any() else 0.0,
        "micro_f1": float(_ratio(2 * tps, 2 * tps + fps + fns)),
    }
    table = [
        {"class": name, "support": int(support[c]), "predicted": int(predicted[c]),
         "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c])}
        for c, name in enumerate(DFC_CLASSES[: len(tp)])
    ]
    return {"metrics": metrics, "per_class": table}


def single_label_metrics(cm: np.ndarray) -> dict:
    """``{"metrics": {...}, "per_class": [...]}`` of a confusion matrix (see module doc)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    total = cm.sum()
    return _summary(tp, cm.sum(0) - tp, cm.sum(1) - tp, tp.sum() / total if total else 0.0)


def multi_label_metrics(counts: np.ndarray) -> dict:
    """``{"metrics": {...}, "per_class": [...]}`` of :func:`multilabel_counts` (see module doc)."""
    tp, fp, fn, tn = np.asarray(counts, dtype=np.int64).T
    decisions = (tp + fp + fn + tn).sum()
    return _summary(tp, fp, fn, (tp + tn).sum() / decisions if decisions else 0.0)


def per_class_markdown(table: list[dict]) -> str:
    """The per-class table as markdown."""
    lines = ["| class | support | predicted | precision | recall | F1 |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['class']} | {r['support']} | {r['predicted']} | {r['precision']:.4f} | "
              f"{r['recall']:.4f} | {r['f1']:.4f} |" for r in table]
    return "\n".join(lines) + "\n"
