"""Evaluation outcomes as count histograms: what a merchant releases instead of exact metrics.

A merchant's held-out evaluation is summarised as counts, one per cell, and the server sums the
counts of every merchant before computing any metric, so the pooled AUC is the AUC over every
merchant's held-out customers, not a mean of per-merchant AUCs.

- binary tasks (`kind="scores"`): `counts[label, bin]`, the number of held-out examples with true
  `label` whose score logit log(p₁/p₀) falls in bin `bin` of `bins` equal-width bins of
  [-LOGIT_RANGE, LOGIT_RANGE] (the outer bins also take everything beyond). Logits, not
  probabilities: DP-trained heads put all held-out probabilities within a few hundredths (measured
  on the demo: 0.001–0.08 after one round), which ten probability bins lump into one bin (AUC 0.5);
  in logit bins of width 0.5 the same scores span about ten bins;
- multi-class tasks (`kind="confusion"`): `counts[true, predicted]`, the confusion matrix.

Each held-out customer contributes one example, so adding or removing one customer changes one
count by 1: the released counts have L2 sensitivity 1. `noised` adds Gaussian noise of standard
deviation σ to every count, the Gaussian mechanism with noise multiplier σ, which the ledger
composes as a subsampled Gaussian with sample rate 1 and one step. The example count is the sum of
the noisy counts (post-processing, free; its noise has standard deviation σ·√cells). Metrics are
computed from sums of noisy counts and only then clipped to their range, so noise in a sum adds
variance but no bias.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_BINS = 24
"""Bins of the score logit. Fewer bins: less noise in the pooled AUC (the noise of the pair count
grows with the number of cells), more binning error (ties inside a bin count ½)."""
LOGIT_RANGE = 6.0
"""Bins cover logits in [-6, 6] (probabilities 0.0025 … 0.9975): a public grid, never the data's."""
SENSITIVITY = 1.0
"""L2 sensitivity of the counts when one customer (one held-out example) is added or removed."""
Kind = Literal["scores", "confusion"]

RECORD = "histograms"
"""Name of the reply's metric record that carries the histograms: name → flat counts (`to_values`)."""
MODEL, LOCAL_BASELINE = "model", "local_baseline"
"""The histograms a merchant may release: the evaluated adapter's, and (once per run) its local baseline's."""
NAMES = frozenset({MODEL, LOCAL_BASELINE})


def shape_for(num_labels: int, bins: int = DEFAULT_BINS) -> tuple[Kind, tuple[int, int]]:
    """The histogram kind and shape for a task with `num_labels` labels (public: both sides agree)."""
    if num_labels < 2:
        raise ValueError(f"a histogram needs at least two labels, got {num_labels}")
    if num_labels == 2:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be even and ≥ 2 (logit 0, p = 0.5, must be a bin edge), got {bins}")
        return "scores", (2, bins)
    return "confusion", (num_labels, num_labels)


@dataclass(frozen=True)
class Histogram:
    """Counts of evaluation outcomes (see the module docstring) and the number of examples.

    Counts are floats: after `noised` they may be fractional or negative.
    """

    kind: Kind
    counts: np.ndarray

    @property
    def examples(self) -> float:
        """The number of examples: the sum of the counts (noisy after `noised`)."""
        return float(self.counts.sum())

    @classmethod
    def of(cls, labels: ArrayLike, probabilities: ArrayLike, bins: int = DEFAULT_BINS) -> Histogram:
        """The exact histogram of held-out `labels` and class `probabilities` (n × labels)."""
        y = np.asarray(labels, dtype=np.int64)
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != y.shape[0]:
            raise ValueError(f"probabilities must be (examples × labels), got {p.shape} for {y.shape[0]}")
        kind, shape = shape_for(p.shape[1], bins)
        counts = np.zeros(shape, dtype=np.float64)
        cell = logit_bin(p, bins) if kind == "scores" else p.argmax(axis=1)
        np.add.at(counts, (y, cell), 1.0)
        return cls(kind, counts)

    def noised(self, noise_multiplier: float, *, seed: int | None = None) -> Histogram:
        """The Gaussian mechanism: N(0, σ²) added to every count (sensitivity 1).

        `seed` is for tests only; otherwise the noise comes from a fresh `secrets` seed.
        """
        if noise_multiplier <= 0:
            raise ValueError(f"eval-noise-multiplier must be positive, got {noise_multiplier}")
        rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        return Histogram(
            self.kind, self.counts + rng.normal(0.0, noise_multiplier * SENSITIVITY, self.counts.shape)
        )

    def __add__(self, other: Histogram) -> Histogram:
        if (self.kind, self.counts.shape) != (other.kind, other.counts.shape):
            raise ValueError(
                f"cannot pool a {other.kind} histogram {other.counts.shape} with a {self.kind} "
                f"histogram {self.counts.shape}"
            )
        return Histogram(self.kind, self.counts + other.counts)

    def to_values(self) -> list[float]:
        """Flat wire form: the counts row by row."""
        return [float(v) for v in self.counts.ravel()]

    @classmethod
    def from_values(cls, values: ArrayLike, num_labels: int, bins: int = DEFAULT_BINS) -> Histogram:
        """Inverse of `to_values` for a task with `num_labels` labels; the shape is the server's own,
        never the sender's. Raises ValueError on a wrong length or a non-finite value."""
        kind, shape = shape_for(num_labels, bins)
        flat = np.asarray(values, dtype=np.float64).ravel()
        if flat.size != shape[0] * shape[1]:
            raise ValueError(f"a {kind} histogram {shape} has {shape[0] * shape[1]} values, got {flat.size}")
        if not np.isfinite(flat).all():
            raise ValueError("histogram values must be finite")
        return cls(kind, flat.reshape(shape).copy())

    def confusion(self) -> np.ndarray:
        """Counts by (true label, predicted label); for scores, predicted = 1 iff logit ≥ 0 (p ≥ 0.5)."""
        if self.kind == "confusion":
            return self.counts
        half = self.counts.shape[1] // 2
        return np.stack([self.counts[:, :half].sum(axis=1), self.counts[:, half:].sum(axis=1)], axis=1)

    def metrics(self) -> dict[str, float | None]:
        """accuracy, macro_f1, examples; for scores also auc and loss (cross-entropy at bin centres).

        A metric that noise made undefined (no positive total count) is None, never left out.
        """
        matrix = self.confusion()
        total = float(matrix.sum())
        defined = total > 0
        out: dict[str, float | None] = {
            "examples": max(0.0, self.examples),
            "accuracy": _clip01(float(np.trace(matrix)) / total) if defined else None,
            "macro_f1": confusion_macro_f1(matrix) if defined else None,
        }
        if self.kind == "scores":
            out["auc"] = binned_auc(self.counts[1], self.counts[0])
            out["loss"] = max(0.0, binned_log_loss(self.counts) / total) if defined else None
        return out


NOISE_DRAWS = 200
"""Draws of the parametric bootstrap behind `noise_errors`."""


def noise_errors(
    histogram: Histogram, cell_sd: float, *, draws: int = NOISE_DRAWS, seed: int = 0
) -> dict[str, float | None]:
    """How much the Gaussian noise moves each metric of a noisy `histogram`: the standard deviation of
    the metric over `draws` copies with fresh N(0, cell_sd²) noise added to every count (a parametric
    bootstrap; `cell_sd` is the noise the counts already carry, √(Σ σ²) for a sum over merchants).

    Post-processing of released values with public parameters: it costs no privacy. A metric that is
    undefined in more than half the draws gets None (the noise swamps it); so does every metric
    when `cell_sd` is not positive (no noise, or not reported)."""
    keys = ("accuracy", "macro_f1") + (("auc", "loss") if histogram.kind == "scores" else ())
    if not cell_sd > 0:
        return dict.fromkeys(keys)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(draws):
        noisy = Histogram(histogram.kind, histogram.counts + rng.normal(0.0, cell_sd, histogram.counts.shape))
        for key, value in noisy.metrics().items():
            if key in values and value is not None:
                values[key].append(float(value))
    return {k: (float(np.std(v)) if len(v) * 2 > draws else None) for k, v in values.items()}


def _clip01(value: float) -> float:
    return min(1.0, max(0.0, value))


def binned_auc(positives: ArrayLike, negatives: ArrayLike) -> float | None:
    """AUC from per-bin counts of positives and negatives (bins in increasing score order): the share
    of (positive, negative) pairs where the positive is in a higher bin, pairs in one bin counting ½.

    Exactly the AUC of scores that are constant inside each bin; for other scores it is within
    ½·Σᵢ pᵢnᵢ / (P·N) of the true AUC. None when either class has no (positive total) count.
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos <= 0 or n_neg <= 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in strictly lower bins
    pairs = float((pos * below).sum() + 0.5 * (pos * neg).sum())
    return _clip01(pairs / (n_pos * n_neg))


def binned_log_loss(counts: np.ndarray) -> float:
    """Summed cross-entropy of a (2 × bins) score histogram, each example at its bin's centre."""
    logit = bin_centres(counts.shape[1])
    # -log σ(z) = softplus(-z), -log(1 - σ(z)) = softplus(z)
    return float((counts[1] * np.logaddexp(0.0, -logit)).sum() + (counts[0] * np.logaddexp(0.0, logit)).sum())


def bin_centres(bins: int) -> np.ndarray:
    """Logit at the centre of each score bin."""
    width = 2 * LOGIT_RANGE / bins
    return -LOGIT_RANGE + (np.arange(bins) + 0.5) * width


def logit_bin(probabilities: np.ndarray, bins: int) -> np.ndarray:
    """Score bin of each row of (examples × 2) `probabilities`: its logit on the public grid."""
    tiny = np.finfo(np.float64).tiny
    logit = np.log(np.maximum(probabilities[:, 1], tiny)) - np.log(np.maximum(probabilities[:, 0], tiny))
    cell = np.floor((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * bins)
    return np.clip(cell, 0, bins - 1).astype(np.int64)


def confusion_macro_f1(matrix: ArrayLike) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions (as `shared.metrics`)."""
    m = np.asarray(matrix, dtype=np.float64)
    scores = []
    for c in range(m.shape[0]):
        tp = max(0.0, float(m[c, c]))
        fp = max(0.0, float(m[:, c].sum()) - float(m[c, c]))
        fn = max(0.0, float(m[c, :].sum()) - float(m[c, c]))
        if tp + fp + fn <= 0:
            continue  # absent from both: it would only add an arbitrary 0 or 1
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0
