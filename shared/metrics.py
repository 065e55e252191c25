"""Classification metrics in plain NumPy: accuracy, macro-F1, ROC AUC (ties averaged), and a paired
bootstrap interval for the AUC difference of two models scored on the same examples."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class AucDifference:
    """AUC(a) − AUC(b) on the same examples, with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float
    draws: int

    def __str__(self) -> str:
        return format_difference(self.estimate, self.low, self.high)


def format_difference(estimate: float, low: float, high: float) -> str:
    """A difference and its interval as reports print them: "+0.020 [-0.097, +0.127]"."""
    return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]"


def _pair_matrix(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[i, j] = 1 if positive i outscores negative j, ½ on a tie, else 0."""
    pos, neg = scores[labels], scores[~labels]
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def paired_auc_difference(
    labels: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    *,
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> AucDifference | None:
    """AUC(a) − AUC(b) and its paired percentile bootstrap interval: every draw resamples the examples
    (with replacement) once and scores both models on that same resample, so what the two models
    share (which examples happen to be held out) cancels. None when a class is absent.

    A draw's AUC is Σ wᵢ wⱼ [sᵢ > sⱼ] / (Σ wᵢ · Σ wⱼ) over positives i and negatives j, w the draw's
    multiplicities: the rank statistic of the resampled data, with no re-sorting. Draws that hold no
    positive or no negative are redrawn (conditional on both classes, as the AUC itself is). The
    seed is fixed so that a report is reproducible; it is a measurement, not a release.
    """
    y = np.asarray(labels).astype(bool)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"labels and scores differ in length: {len(y)}, {len(a)}, {len(b)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    diff_matrix = _pair_matrix(y, a) - _pair_matrix(y, b)
    estimate = float(diff_matrix.mean())
    rng = np.random.default_rng(seed)
    out = np.empty(0)
    while len(out) < draws:
        w = rng.multinomial(len(y), np.full(len(y), 1.0 / len(y)), size=draws).astype(np.float64)
        w_pos, w_neg = w[:, y], w[:, ~y]
        pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
        ok = pairs > 0
        diff = np.einsum("bi,ij,bj->b", w_pos[ok], diff_matrix, w_neg[ok]) / pairs[ok]
        out = np.concatenate([out, diff])
    out = out[:draws]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(out, [tail, 1.0 - tail])
    return AucDifference(estimate, float(low), float(high), level, draws)
