"""The noise bands of `shared.noise_bands` against a Monte Carlo simulation of the mechanism itself:
many independent noisy releases of one exact histogram, each metric recomputed here from the raw
counts (code independent of the module and of `shared.histograms`), and the bands' readability rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.histograms import Histogram
from shared.noise_bands import (
    MAX_SD,
    MIN_SDS,
    Z95,
    Band,
    analytic_sd,
    band_of,
    bands,
    describe,
    per_count_sd,
)

RELEASES = 2000


# --- an independent implementation of the metrics, unclipped (the noise's own spread) ---------------


def _confusion(counts: np.ndarray, kind: str) -> np.ndarray:
    if kind == "confusion":
        return counts
    half = counts.shape[1] // 2
    return np.array([[row[:half].sum(), row[half:].sum()] for row in counts])


def mc_accuracy(counts: np.ndarray, kind: str) -> float:
    m = _confusion(counts, kind)
    return float(sum(m[i, i] for i in range(len(m))) / m.sum())


def mc_macro_f1(counts: np.ndarray, kind: str) -> float:
    m = _confusion(counts, kind)
    scores = []
    for c in range(len(m)):
        tp, fp, fn = m[c, c], m[:, c].sum() - m[c, c], m[c, :].sum() - m[c, c]
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def mc_auc(counts: np.ndarray) -> float:
    neg, pos = counts[0], counts[1]
    bins = len(pos)
    # every (positive bin i, negative bin j) pair: 1 if i > j, ½ if i == j
    weight = np.array([[1.0 if i > j else 0.5 if i == j else 0.0 for j in range(bins)] for i in range(bins)])
    return float(pos @ weight @ neg / (pos.sum() * neg.sum()))


def mc_loss(counts: np.ndarray) -> float:
    bins = counts.shape[1]
    centres = np.linspace(-6.0, 6.0, bins + 1)[:-1] + 6.0 / bins  # the public logit grid's bin centres
    p1 = 1.0 / (1.0 + np.exp(-centres))
    return float(-(counts[1] * np.log(p1)).sum() - (counts[0] * np.log(1.0 - p1)).sum()) / counts.sum()


def mc_metrics(counts: np.ndarray, kind: str) -> dict[str, float]:
    out = {
        "accuracy": mc_accuracy(counts, kind),
        "macro_f1": mc_macro_f1(counts, kind),
        "examples": float(counts.sum()),
    }
    if kind == "scores":
        out |= {"auc": mc_auc(counts), "loss": mc_loss(counts)}
    return out


def releases(exact: np.ndarray, cell_sd: float, n: int, seed: int) -> np.ndarray:
    """`n` independent noisy releases of `exact` (the Gaussian mechanism, summed over merchants)."""
    rng = np.random.default_rng(seed)
    return exact[None] + rng.normal(0.0, cell_sd, (n, *exact.shape))


def binary_histogram(n: int, seed: int) -> Histogram:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    p1 = 1 / (1 + np.exp(-(rng.normal(0.0, 1.5, n) + 1.4 * y - 0.8)))
    return Histogram.of(y, np.stack([1 - p1, p1], axis=1))


def multiclass_histogram(n: int, k: int, seed: int) -> Histogram:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0.0, 1.0, (n, k))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits)
    return Histogram.of(y, p / p.sum(axis=1, keepdims=True))


SCENARIOS = {
    # name: (exact histogram, per-count noise sd): clear of the noise, where the delta method holds
    "binary, 4 merchants x 5,000 customers, sigma 20": (
        binary_histogram(20_000, 1),
        per_count_sd([20.0] * 4),
    ),
    "binary, 2 x 2,000, sigma 10": (binary_histogram(4_000, 2), per_count_sd([10.0, 10.0])),
    "4 classes, 3,000, sigma 8": (multiclass_histogram(3_000, 4, 3), 8.0),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_analytic_sd_matches_the_spread_of_independent_releases(name: str) -> None:
    exact, cell_sd = SCENARIOS[name]
    draws = releases(exact.counts, cell_sd, RELEASES, seed=7)
    simulated = [mc_metrics(d, exact.kind) for d in draws]
    at_exact = analytic_sd(exact.counts, exact.kind, cell_sd)
    # what the coordinator can compute: the sd at the noisy counts it received
    at_releases = [analytic_sd(d, exact.kind, cell_sd) for d in releases(exact.counts, cell_sd, 200, seed=8)]
    assert set(at_exact) == set(simulated[0])
    for key in at_exact:
        spread = float(np.std([s[key] for s in simulated]))
        # the sd of an sd estimate from 2,000 draws is ~1.6%; the delta method's own error is smaller here
        assert at_exact[key] == pytest.approx(spread, rel=0.08), key
        ratios = np.array([a[key] for a in at_releases]) / spread
        assert abs(float(np.median(ratios)) - 1.0) < 0.06, key
        assert ratios.min() > 0.8 and ratios.max() < 1.2, key


@pytest.mark.parametrize("name", list(SCENARIOS)[:2])
def test_the_95_percent_band_of_a_release_covers_the_exact_metric(name: str) -> None:
    exact, cell_sd = SCENARIOS[name]
    truth = mc_metrics(exact.counts, exact.kind)
    hits = dict.fromkeys(("accuracy", "auc", "loss", "macro_f1"), 0)
    trials = 400
    for draw in releases(exact.counts, cell_sd, trials, seed=11):
        noisy = Histogram(exact.kind, draw)
        found = bands(draw, exact.kind, cell_sd, noisy.metrics())
        for key in hits:
            hits[key] += found[key].low <= truth[key] <= found[key].high
    for key, n in hits.items():
        assert 0.91 <= n / trials <= 0.99, (key, n / trials)


def test_the_demo_scale_is_unreadable_and_says_why() -> None:
    """4 merchants x ~100 held-out customers at the default sigma 20: the noise sd of the total
    (40 x sqrt(48) = 277) is close to the total itself. The clipped values are never read as results."""
    exact = binary_histogram(400, 4)
    cell_sd = per_count_sd([20.0] * 4)
    for seed in range(20):
        noisy = exact.noised(cell_sd, seed=seed)
        values = noisy.metrics()
        found = bands(noisy.counts, noisy.kind, cell_sd, values)
        assert set(found) == {"accuracy", "macro_f1", "auc", "loss", "examples"}
        for key, band in found.items():
            assert not band.readable, (seed, key, band)
            assert "within 3 noise sd of zero" in band.reason
        assert found["examples"].sd == pytest.approx(cell_sd * math.sqrt(48))
        assert describe("auc", found["auc"]).startswith("AUC unreadable (")


def test_a_large_evaluation_is_readable() -> None:
    exact, cell_sd = SCENARIOS["binary, 4 merchants x 5,000 customers, sigma 20"]
    noisy = Histogram(exact.kind, releases(exact.counts, cell_sd, 1, seed=3)[0])
    found = bands(noisy.counts, noisy.kind, cell_sd, noisy.metrics())
    assert all(b.readable and b.reason == "" for b in found.values())
    auc = found["auc"]
    assert auc.value is not None and auc.sd is not None
    assert (auc.low, auc.high) == (
        pytest.approx(auc.value - Z95 * auc.sd),
        pytest.approx(auc.value + Z95 * auc.sd),
    )
    assert describe("auc", auc) == f"AUC {auc.value:.3f} ± {auc.sd:.3f}"
    assert found["examples"].value == round(noisy.counts.sum())  # a noisy count, rounded
    assert describe("examples", found["examples"]) == f"examples {round(noisy.counts.sum())} ± 277"


def test_more_customers_asked_for_bring_the_sd_under_the_threshold() -> None:
    """At a fixed noise every metric's sd falls as 1/N, so the customers the reason asks for are
    enough: scaling the counts by (N + more) / N brings the sd to the threshold."""
    exact = binary_histogram(2_000, 5)
    cell_sd = 40.0
    sds = analytic_sd(exact.counts, exact.kind, cell_sd)
    assert sds["auc"] is not None and sds["auc"] > MAX_SD
    found = bands(exact.counts, exact.kind, cell_sd, exact.metrics())
    reason = found["auc"].reason
    assert reason.startswith(f"noise sd {sds['auc']:.2f} > {MAX_SD:g}; needs ~")
    more = float(reason.split("needs ~")[1].split(" ")[0].replace(",", ""))
    scaled = exact.counts * (exact.counts.sum() + more) / exact.counts.sum()
    after = analytic_sd(scaled, exact.kind, cell_sd)["auc"]
    assert after is not None and MAX_SD * 0.95 <= after <= MAX_SD
    twice = analytic_sd(exact.counts * 2, exact.kind, cell_sd)["auc"]
    assert twice == pytest.approx(sds["auc"] / 2)


def test_a_class_within_the_noise_makes_the_auc_unreadable() -> None:
    counts = np.zeros((2, 24))
    counts[0, :12] = 400.0  # 4,800 negatives, clear of the noise
    counts[1, 12:] = 5.0  # 60 positives: their noise sd is 20 x sqrt(24) = 98
    found = bands(counts, "scores", 20.0, Histogram("scores", counts).metrics())
    assert found["accuracy"].readable
    assert not found["auc"].readable and "held-out positives 60 ± 98" in found["auc"].reason
    assert "needs at least ~" in found["auc"].reason


def test_band_record_round_trip_and_ranges() -> None:
    band = band_of("accuracy", 0.97, 0.03)
    assert band.readable and band.high == 1.0 and band.low == pytest.approx(0.97 - Z95 * 0.03)
    assert Band.from_record(band.to_record(), "accuracy") == band
    loose = band_of("loss", 0.4, 0.5)
    assert not loose.readable and loose.low == 0.0 and loose.reason == f"noise sd 0.50 > {MAX_SD:g}"
    undefined = band_of(
        "auc", None, None, reason="the held-out positives -3 ± 98 are within 3 noise sd of zero"
    )
    assert (undefined.low, undefined.high, undefined.readable) == (0.0, 1.0, False)
    record = undefined.to_record()
    assert record["value"] is None and record["reason"].startswith("the held-out positives")
    assert Band.from_record(record, "auc") == undefined
    assert band_of("examples", 500.0, 200.0).readable  # a count is judged by MIN_SDS, never by MAX_SD
    assert MIN_SDS == 3.0
    assert per_count_sd([3.0, 4.0]) == pytest.approx(5.0)


@pytest.mark.parametrize(("kind", "shape"), [("scores", (2, 24)), ("confusion", (4, 4))])
def test_accuracy_floor_is_a_floor_whatever_the_data(kind: str, shape: tuple[int, int]) -> None:
    """No histogram with fewer held-out customers than `accuracy_floor` reads its accuracy within
    MAX_SD; the demo-scale reason asks for at least that many."""
    from shared.noise_bands import accuracy_floor

    cell_sd = 40.0
    floor = accuracy_floor(shape, kind, cell_sd)
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.dirichlet(np.full(shape[0] * shape[1], 0.3)).reshape(shape) * floor * 0.99
        sd = analytic_sd(counts, kind, cell_sd)["accuracy"]
        assert sd is not None and sd > MAX_SD
    exact = binary_histogram(400, 4)
    found = bands(exact.counts, exact.kind, cell_sd, exact.metrics())
    more = round(accuracy_floor((2, 24), "scores", cell_sd) - exact.counts.sum(), -1)
    assert f"needs at least ~{more:,.0f} more held-out customers" in found["accuracy"].reason
