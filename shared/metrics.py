"""Classification metrics in plain NumPy: accuracy, macro-F1, ROC AUC (ties averaged)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def accuracy(labels: ArrayLike, predictions: ArrayLike) -> float:
    y, p = np.asarray(labels), np.asarray(predictions)
    return float((y == p).mean()) if y.size else 0.0


def top_k_accuracy(labels: ArrayLike, probabilities: ArrayLike, k: int) -> float:
    """Share of examples whose label is among the k highest-scored classes (ties: lower index first)."""
    y, p = np.asarray(labels), np.asarray(probabilities)
    if not y.size:
        return 0.0
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def macro_f1(labels: ArrayLike, predictions: ArrayLike, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    y, p = np.asarray(labels), np.asarray(predictions)
    scores = []
    for c in range(num_classes):
        tp = int(((p == c) & (y == c)).sum())
        fp = int(((p == c) & (y != c)).sum())
        fn = int(((p != c) & (y == c)).sum())
        if tp + fp + fn == 0:
            continue  # class absent from both: it would only add an arbitrary 0 or 1
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Probability that a random positive scores above a random negative (Mann–Whitney U).

    None when only one class is present (AUC undefined).
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
