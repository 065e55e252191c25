"""Evaluation histograms: pooled metrics against scikit-learn, the noise, the wire form, the charge."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from shared.histograms import Histogram, binned_auc, shape_for
from shared.privacy import Charge, epsilon_of


def probs_of(p1: list[float] | np.ndarray) -> np.ndarray:
    p = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p, p], axis=1)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_hand_checked_binary_case() -> None:
    labels = [0, 0, 1, 1, 1]
    p1 = [0.1, 0.6, 0.3, 0.8, 0.99]
    # 12 bins of width 1 on the logit grid [-6, 6]: logits -2.20, 0.41, -0.85, 1.39, 4.60
    h = Histogram.of(labels, probs_of(p1), bins=12)
    expected = np.zeros((2, 12))
    expected[0, [3, 6]] = 1
    expected[1, [5, 7, 10]] = 1
    np.testing.assert_array_equal(h.counts, expected)
    m = h.metrics()
    # pairs (positive above negative): 0.3 > 0.1; 0.8 and 0.99 above both → 5 of 3·2, no ties
    assert m["auc"] == pytest.approx(5 / 6) == pytest.approx(roc_auc_score(labels, p1))
    assert m["accuracy"] == pytest.approx(3 / 5)  # predicted 1 iff p ≥ 0.5: 0, 1, 0, 1, 1
    assert m["macro_f1"] == pytest.approx((2 * 1 / (2 + 1 + 1) + 2 * 2 / (4 + 1 + 1)) / 2)
    # cross-entropy at the bin centres' logits -2.5, 0.5 (label 0) and -0.5, 1.5, 4.5 (label 1)
    loss = softplus(-2.5) + softplus(0.5) + softplus(0.5) + softplus(-1.5) + softplus(-4.5)
    assert m["loss"] == pytest.approx(loss / 5)
    assert m["examples"] == 5


def test_logits_beyond_the_grid_go_to_the_outer_bins() -> None:
    h = Histogram.of([0, 1, 1], probs_of([0.0, 1.0, 0.5 + 1e-9]), bins=4)
    np.testing.assert_array_equal(h.counts, [[1, 0, 0, 0], [0, 0, 1, 1]])


def test_ties_inside_a_bin_count_half() -> None:
    h = Histogram.of([0, 1], probs_of([0.3, 0.4]), bins=2)  # both in [0, 0.5)
    assert h.metrics()["auc"] == 0.5  # the exact AUC is 1: within the bound ½·1·1/(1·1)


@pytest.mark.parametrize("seed", range(10))
def test_pooled_auc_equals_sklearn_on_pooled_scores_within_binning_error(seed: int) -> None:
    rng = np.random.default_rng(seed)
    merchants = []
    for _ in range(3):
        n = int(rng.integers(30, 200))
        y = (rng.random(n) < rng.uniform(0.1, 0.5)).astype(int)
        s = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * y - 1)))
        merchants.append((y, s))
    pooled = sum(
        (Histogram.of(y, probs_of(s), bins=50) for y, s in merchants[1:]),
        Histogram.of(merchants[0][0], probs_of(merchants[0][1]), bins=50),
    )
    y_all = np.concatenate([y for y, _ in merchants])
    s_all = np.concatenate([s for _, s in merchants])
    np.testing.assert_array_equal(pooled.counts, Histogram.of(y_all, probs_of(s_all), bins=50).counts)
    pos, neg = pooled.counts[1], pooled.counts[0]
    bound = 0.5 * float((pos * neg).sum()) / (pos.sum() * neg.sum())
    exact = roc_auc_score(y_all, s_all)
    assert abs(pooled.metrics()["auc"] - exact) <= bound + 1e-12
    assert abs(pooled.metrics()["auc"] - exact) < 0.02
    assert pooled.metrics()["accuracy"] == pytest.approx(accuracy_score(y_all, s_all >= 0.5))
    f1 = f1_score(y_all, s_all >= 0.5, average="macro")
    assert pooled.metrics()["macro_f1"] == pytest.approx(f1)


def test_auc_is_exact_for_scores_constant_inside_bins() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    logit = -6 + (rng.integers(0, 10, 300) + 0.5) * 1.2  # bin centres of 10 bins: ties only within bins
    s = 1 / (1 + np.exp(-logit))
    assert Histogram.of(y, probs_of(s), bins=10).metrics()["auc"] == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("seed", range(5))
def test_confusion_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 150, 4
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n)
    h = Histogram.of(y, probs)
    assert h.kind == "confusion" and h.counts.shape == (k, k)
    predicted = probs.argmax(axis=1)
    m = h.metrics()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, predicted))
    assert m["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    assert "auc" not in m and m["examples"] == n


def test_noise_is_gaussian_with_std_sigma_and_fresh_by_default() -> None:
    y = np.zeros(10, dtype=int)
    h = Histogram.of(y, probs_of(np.full(10, 0.2)), bins=20000)  # 40,000 cells, ten of them non-zero
    noisy = h.noised(5.0, seed=1)
    diff = (noisy.counts - h.counts).ravel()
    assert abs(diff.mean()) < 0.1 and diff.std() == pytest.approx(5.0, rel=0.03)
    assert noisy.examples == pytest.approx(float(noisy.counts.sum()))
    a, b = h.noised(5.0), h.noised(5.0)
    assert not np.array_equal(a.counts, b.counts)  # production noise: a fresh seed every call
    with pytest.raises(ValueError, match="eval-noise-multiplier"):
        h.noised(0.0)


def test_noisy_metrics_stay_in_range() -> None:
    h = Histogram.of([0, 1, 1], probs_of([0.2, 0.7, 0.9])).noised(50.0, seed=4)
    m = h.metrics()
    assert {"accuracy", "macro_f1", "auc", "loss", "examples"} <= set(m)  # None when undefined, never absent
    for key in ("accuracy", "macro_f1", "auc"):
        value = m[key]
        assert value is None or 0.0 <= value <= 1.0
    assert m["examples"] is not None and m["examples"] >= 0.0


def test_wire_form_round_trips_and_the_server_keeps_its_own_shape() -> None:
    h = Histogram.of([0, 1, 1], probs_of([0.2, 0.7, 0.9])).noised(1.0, seed=2)
    back = Histogram.from_values(h.to_values(), num_labels=2)
    np.testing.assert_array_equal(back.counts, h.counts)
    with pytest.raises(ValueError, match="has 48 values"):
        Histogram.from_values([1.0] * 21, num_labels=2)
    with pytest.raises(ValueError, match="finite"):
        Histogram.from_values([math.nan] * 48, num_labels=2)
    with pytest.raises(ValueError, match="cannot pool"):
        _ = h + Histogram.of([0, 1, 2], np.eye(3))
    with pytest.raises(ValueError, match="even"):
        shape_for(2, bins=5)


def test_binned_auc_undefined_without_both_classes() -> None:
    assert binned_auc([0, 0], [3, 1]) is None
    assert binned_auc([-2.0, 1.0], [1, 1]) is None  # noise can make a class total non-positive


def _gaussian_mechanism_delta(eps: float, sigma: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism, sensitivity 1 (Balle & Wang 2018, Theorem 8)."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)


@pytest.mark.parametrize("sigma", [2.0, 5.0, 20.0])
def test_one_release_is_charged_as_the_gaussian_mechanism(sigma: float) -> None:
    delta = 1e-6
    low, high = 0.0, 20.0
    for _ in range(100):  # the exact ε at δ, by bisection on the analytic curve
        mid = (low + high) / 2
        low, high = (mid, high) if _gaussian_mechanism_delta(mid, sigma) > delta else (low, mid)
    ledger_eps = epsilon_of([Charge(1, "run", sigma, 1.0, 1, 1.0)], delta)
    # the ledger's PLD is a pessimistic upper bound, tight to well under 1%
    assert high <= ledger_eps <= high * 1.01 + 1e-3


def test_noise_errors_match_the_spread_of_independent_noisy_releases() -> None:
    """The bootstrap's noise sd of the AUC equals the spread over many independent noisy releases of
    the same exact histogram (computed here without `noise_errors`), and is None without noise."""
    from shared.histograms import noise_errors

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 4000)
    p1 = 1 / (1 + np.exp(-(rng.normal(0, 1.5, 4000) + 1.2 * labels)))
    exact = Histogram.of(labels, np.stack([1 - p1, p1], axis=1))
    sigma = 30.0
    releases = [exact.noised(sigma, seed=s) for s in range(300)]
    spread = float(np.std([r.metrics()["auc"] for r in releases]))
    estimated = noise_errors(releases[0], sigma)
    assert estimated["auc"] is not None
    assert abs(estimated["auc"] - spread) < 0.25 * spread
    assert noise_errors(exact, 0.0) == dict.fromkeys(("accuracy", "macro_f1", "auc", "loss"))
    # swamped: a handful of examples under σ = 50 leaves the AUC undefined in most draws or very noisy
    tiny = Histogram.of([0, 1, 0, 1], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]).noised(50.0, seed=1)
    swamped = noise_errors(tiny, 50.0)
    assert swamped["auc"] is None or swamped["auc"] > 0.1
