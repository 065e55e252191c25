"""Tests of shared/metrics.py against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from shared.metrics import accuracy, macro_f1, roc_auc

SEEDS = range(25)


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    k = int(rng.integers(2, 7))
    y, p = rng.integers(0, k, n), rng.integers(0, k, n)
    assert accuracy(y, p) == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert accuracy(list(y), list(p)) == pytest.approx(accuracy_score(y, p), abs=1e-12)


def test_accuracy_edge_cases() -> None:
    assert accuracy([], []) == 0.0
    assert accuracy([1, 0, 1], [1, 0, 1]) == 1.0
    assert accuracy([1, 0, 1, 1], [0, 0, 0, 1]) == 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    k = int(rng.integers(2, 7))
    # skewed label distribution so that some classes are often missing from labels or predictions
    probs = rng.dirichlet(np.full(k, 0.5))
    y = rng.choice(k, size=n, p=probs)
    p = np.where(rng.random(n) < 0.5, y, rng.choice(k, size=n, p=probs))
    expected = f1_score(y, p, average="macro", zero_division=0)
    assert macro_f1(y, p, num_classes=k) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_ignores_classes_absent_from_both() -> None:
    y = [0, 0, 1, 1]
    p = [0, 1, 1, 1]
    # classes 2..5 appear nowhere: they must not drag the mean towards 0 (or 1)
    assert macro_f1(y, p, num_classes=6) == pytest.approx(f1_score(y, p, average="macro"))
    assert macro_f1(y, p, num_classes=6) == pytest.approx((2 / 3 + 0.8) / 2)


def test_macro_f1_class_only_predicted_counts_as_zero() -> None:
    y = [0, 0, 0]
    p = [0, 0, 2]
    assert macro_f1(y, p, num_classes=3) == pytest.approx((0.8 + 0.0) / 2)
    assert macro_f1(y, p, num_classes=3) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_macro_f1_perfect_and_empty() -> None:
    assert macro_f1([0, 1, 2, 2], [0, 1, 2, 2], num_classes=3) == 1.0
    assert macro_f1([], [], num_classes=3) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_roc_auc_matches_sklearn_with_ties(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes present
    s = rng.random(n) + 0.3 * y  # informative but overlapping
    if decimals is not None:
        s = np.round(s, decimals)  # many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_known_values() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one positive tied with one of two negatives, above the other: (1 + 0.5) / 2
    assert roc_auc([0, 0, 1], [0.2, 0.5, 0.5]) == pytest.approx(0.75)
    assert roc_auc([False, True], [0.0, 1.0]) == 1.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1, 1], [1], []])
def test_roc_auc_none_with_one_class(labels: list[int]) -> None:
    assert roc_auc(labels, np.linspace(0, 1, len(labels))) is None
