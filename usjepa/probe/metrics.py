"""Classification metrics (numpy) and few-shot subsets.

F1 per class is 2·TP / (2·TP + FP + FN), 0 for a class that is neither present nor predicted; macro F1 is
the unweighted mean over all classes of the task (as scikit-learn's ``f1_score(average="macro")`` with the
full label list).
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    return float(per_class_f1(y_true, y_pred, n_classes).mean())


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true)
    return float((y_true == np.asarray(y_pred)).mean()) if len(y_true) else float("nan")


def scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    f1 = per_class_f1(y_true, y_pred, n_classes)
    return {"macro_f1": float(f1.mean()), "accuracy": accuracy(y_true, y_pred), "per_class_f1": f1.tolist()}


def mean_std(values) -> dict:
    """Mean and sample standard deviation (ddof=1) over seeds; exactly 0 when all values are equal (one value,
    or seeds that agree), not a rounding residue, so the report can say the spread was not measured."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 and np.ptp(v) > 0 else 0.0}


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions of a stratified ``fraction`` of ``labels``: round(fraction·n_c) per class, at least one.

    The per-class counts do not depend on the seed, so every seed's subset has the same size.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"few-shot fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(pos))))
        picked.append(rng.permutation(pos)[:k] if k < len(pos) else pos)
    return np.sort(np.concatenate(picked))
