"""Noise bands of the metrics the coordinator derives from DP-noised evaluation counts.

Every merchant releases its held-out evaluation as count histograms with Gaussian noise of standard
deviation σ (its `eval-noise-multiplier`, sensitivity 1) on every count (`shared.histograms`). The
coordinator sums the merchants' counts, so every pooled count carries independent noise of standard
deviation s = √(Σ σᵢ²) (`per_count_sd`), and derives accuracy, macro-F1, AUC, loss and the example
count from those sums. σ is public, so how far the noise moves each derived metric is public too:
this module propagates s through each metric by the delta method (first-order Taylor expansion: the
metric's gradient with respect to every count, Var ≈ s²·Σ gradient²). It reads only released values
and public parameters: post-processing, it costs no privacy.

A metric is *unreadable* when the noise swamps it, by either rule (the thresholds are stated here so
that every view says the same):

- its noise sd exceeds `MAX_SD` (0.1: on a rate in [0, 1] the band then spans more than ±0.2);
- a count it divides by (the held-out total; for the AUC the positives and the negatives) is not above
  `MIN_SDS` (3) times that count's own noise sd: the noisy total may be near zero or negative, the
  metric then comes out clipped (accuracy 1.000, loss 0.000) or undefined, and the delta method itself
  no longer holds.

At a fixed noise (the same merchants with the same σ) a metric's sd shrinks like 1/N in the number N
of held-out customers, which gives the "needs about M more held-out customers" of `Band.reason`: a
rough guide, not a promise (more merchants also add their own noise).

`Band`: value ± sd, and the 95% band value ± 1.96·sd clipped to the metric's range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from shared.histograms import bin_centres

MAX_SD = 0.1
"""A metric whose noise sd is above this is unreadable (accuracy, macro-F1 and AUC are rates in
[0, 1]; the loss is in nats, where chance is 0.69 for a balanced binary task)."""
MIN_SDS = 3.0
"""A count a metric divides by must exceed this many times its own noise sd."""
Z95 = 1.959963984540054
"""The two-sided 95% normal quantile: band = value ± Z95·sd."""
METRICS = ("accuracy", "macro_f1", "auc", "loss", "examples")
"""What `bands` returns for a score histogram (a confusion matrix has no auc and no loss)."""
RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "macro_f1": (0.0, 1.0),
    "auc": (0.0, 1.0),
    "loss": (0.0, math.inf),
    "examples": (0.0, math.inf),
}
LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "auc": "AUC",
    "loss": "loss",
    "examples": "examples",
}
"""How people read each metric's name."""


def per_count_sd(sigmas: Iterable[float]) -> float:
    """The noise sd of a sum of counts released with noise multipliers `sigmas` (sensitivity 1)."""
    return math.sqrt(sum(float(s) ** 2 for s in sigmas))


@dataclass(frozen=True)
class Band:
    """A metric computed from noisy counts, and how far the noise moves it.

    `value`: the metric as computed from the noisy counts (None when the noise made it undefined);
    `sd`: its noise standard deviation (None when it cannot be computed: a denominator ≤ 0);
    `low`, `high`: the 95% band, value ± 1.96·sd clipped to the metric's range (the whole range when
    `sd` is None); `readable`: whether the noise leaves the value worth reading (module docstring);
    `reason`: in plain words, why not (empty when readable)."""

    value: float | None
    sd: float | None
    low: float
    high: float
    readable: bool
    reason: str = ""

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form (`metrics.jsonl`'s `bands`); `from_record` reads it back."""
        record: dict[str, Any] = {
            "value": self.value,
            "sd": self.sd,
            "low": _finite_or_none(self.low),
            "high": _finite_or_none(self.high),
            "readable": self.readable,
        }
        if self.reason:
            record["reason"] = self.reason
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any], key: str = "") -> Band:
        lo, hi = RANGES.get(key, (-math.inf, math.inf))
        low, high = record.get("low"), record.get("high")
        return cls(
            value=record.get("value"),
            sd=record.get("sd"),
            low=lo if low is None else float(low),
            high=hi if high is None else float(high),
            readable=bool(record.get("readable")),
            reason=str(record.get("reason", "")),
        )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def band_of(key: str, value: float | None, sd: float | None, *, reason: str = "") -> Band:
    """A `Band` from a value and its sd; unreadable when `reason` is given, when sd is unknown or
    above `MAX_SD` (counts: never by sd, only by `reason`)."""
    lo, hi = RANGES.get(key, (-math.inf, math.inf))
    if value is None or sd is None or not math.isfinite(sd):
        return Band(value, None, lo, hi, False, reason or "the noise leaves it undefined")
    low, high = max(lo, value - Z95 * sd), min(hi, value + Z95 * sd)
    if not reason and key != "examples" and sd > MAX_SD:
        reason = f"noise sd {sd:.2f} > {MAX_SD:g}"
    return Band(value, sd, low, high, not reason, reason)


# ----------------------------------------------------------------------------- the gradients


def _structure(counts: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every cell: its true label, its predicted label (scores: logit ≥ 0), as index arrays of the
    counts' shape, and the confusion matrix they add up to."""
    grid = np.indices(counts.shape)
    rows, cols = np.asarray(grid[0]), np.asarray(grid[1])
    if kind == "scores":
        predicted = (cols >= counts.shape[1] // 2).astype(np.int64)
        k = 2
    else:
        predicted = cols
        k = counts.shape[0]
    confusion = np.zeros((k, k))
    np.add.at(confusion, (rows, predicted), counts)
    return rows, predicted, confusion


def _accuracy_gradient(counts: np.ndarray, kind: str) -> np.ndarray | None:
    rows, predicted, confusion = _structure(counts, kind)
    total = float(counts.sum())
    if total <= 0:
        return None
    accuracy = float(np.trace(confusion)) / total
    return ((rows == predicted).astype(np.float64) - accuracy) / total


def _loss_weights(counts: np.ndarray) -> np.ndarray:
    logit = bin_centres(counts.shape[1])
    # -log σ(z) = softplus(-z) for label 1, -log(1 - σ(z)) = softplus(z) for label 0
    return np.stack([np.logaddexp(0.0, logit), np.logaddexp(0.0, -logit)])


def _loss_gradient(counts: np.ndarray) -> np.ndarray | None:
    total = float(counts.sum())
    if total <= 0:
        return None
    weights = _loss_weights(counts)
    loss = float((weights * counts).sum()) / total
    return (weights - loss) / total


def _auc_gradient(counts: np.ndarray) -> np.ndarray | None:
    pos, neg = counts[1], counts[0]
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos <= 0 or n_neg <= 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in strictly lower bins
    above = np.concatenate([np.cumsum(pos[::-1])[:-1][::-1], [0.0]])  # positives in strictly higher bins
    pairs = n_pos * n_neg
    auc = float((pos * below).sum() + 0.5 * (pos * neg).sum()) / pairs
    d_pos = (below + 0.5 * neg) / pairs - auc / n_pos
    d_neg = (above + 0.5 * pos) / pairs - auc / n_neg
    return np.stack([d_neg, d_pos])


def _macro_f1_gradient(counts: np.ndarray, kind: str) -> np.ndarray | None:
    rows, predicted, confusion = _structure(counts, kind)
    k = confusion.shape[0]
    row_sums, col_sums, diagonal = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    gradient = np.zeros_like(confusion)
    present = 0
    for c in range(k):
        denominator = float(row_sums[c] + col_sums[c])  # 2·tp + fp + fn
        if denominator <= 0:
            continue  # absent from both (as `confusion_macro_f1` skips it)
        present += 1
        f1_slope = -2.0 * float(diagonal[c]) / denominator**2
        gradient[c, :] += f1_slope  # every cell of row c is in R_c
        gradient[:, c] += f1_slope  # every cell of column c is in C_c (the diagonal: in both)
        gradient[c, c] += 2.0 / denominator
    if present == 0:
        return None
    return gradient[rows, predicted] / present  # each cell moves its confusion cell


def analytic_sd(counts: ArrayLike, kind: str, cell_sd: float) -> dict[str, float | None]:
    """The delta-method noise sd of each metric of a histogram whose every count carries independent
    N(0, cell_sd²) noise, evaluated at `counts` (None where a denominator is ≤ 0)."""
    c = np.asarray(counts, dtype=np.float64)
    gradients = {
        "accuracy": _accuracy_gradient(c, kind),
        "macro_f1": _macro_f1_gradient(c, kind),
    }
    if kind == "scores":
        gradients["auc"] = _auc_gradient(c)
        gradients["loss"] = _loss_gradient(c)
    out: dict[str, float | None] = {
        key: None if g is None else cell_sd * float(np.sqrt((g**2).sum())) for key, g in gradients.items()
    }
    out["examples"] = cell_sd * math.sqrt(c.size)
    return out


# ----------------------------------------------------------------------------- readability


def _more(count: float, needed: float, share: float = 1.0, *, at_least: bool = False) -> str:
    """'; needs ~M more held-out customers' for a count that should reach `needed` (`share`: the
    fraction of customers that add to it), or '' when that cannot be estimated. `at_least`: the
    count rule, a lower bound (the sd rule may ask for more once the count is clear of the noise)."""
    if not (share > 0 and math.isfinite(needed)):
        return ""
    more = max(0.0, needed - max(count, 0.0)) / share
    bound = "at least " if at_least else ""
    return f"; needs {bound}~{_round_up(more)} more held-out customers" if more > 0 else ""


def _round_up(value: float) -> str:
    """A rough count for people: two significant figures, rounded up."""
    if value < 100:
        return str(max(1, math.ceil(value)))
    scale = 10 ** (int(math.log10(value)) - 1)
    return f"{math.ceil(value / scale) * scale:,}"


def bands(
    counts: ArrayLike, kind: str, cell_sd: float, values: Mapping[str, float | None]
) -> dict[str, Band]:
    """The noise band of each metric of a noisy histogram.

    `counts`: the (pooled) noisy counts; `kind`: "scores" or "confusion" (`shared.histograms`);
    `cell_sd`: the noise sd every count carries (`per_count_sd` of the merchants' σ); `values`: the
    metrics as published (`Histogram.metrics()`, clipped to their ranges), which the bands surround.
    """
    c = np.asarray(counts, dtype=np.float64)
    sds = analytic_sd(c, kind, cell_sd)
    total = float(c.sum())
    total_sd = sds["examples"] or 0.0
    out: dict[str, Band] = {}
    total_ok = total > MIN_SDS * total_sd
    within = f"the held-out count {total:.0f} ± {total_sd:.0f} is within {MIN_SDS:g} noise sd of zero"
    count_reason = "" if total_ok else within + _more(total, MIN_SDS * total_sd, at_least=True)
    examples = values.get("examples")
    out["examples"] = band_of(
        "examples",
        None if examples is None else float(round(examples)),
        total_sd,
        reason=count_reason,
    )
    for key in ("accuracy", "macro_f1", "auc", "loss"):
        if key not in sds:
            continue
        sd = sds[key]
        reason = count_reason or (_class_reason(c, cell_sd, total) if key == "auc" else "")
        if count_reason and key == "accuracy":  # a floor that holds whatever the accuracy is
            needed = max(MIN_SDS * total_sd, accuracy_floor(c.shape, kind, cell_sd))
            reason = within + _more(total, needed, at_least=True)
        if reason:
            if sd is not None and sd <= RANGES[key][1] - RANGES[key][0]:  # wider than the range: says nothing
                reason = f"noise sd {sd:.2f}; {reason}"
        elif sd is not None and sd > MAX_SD:
            reason = f"noise sd {sd:.2f} > {MAX_SD:g}" + _more(total, total * sd / MAX_SD)
        out[key] = band_of(key, values.get(key), sd, reason=reason)
    return out


def accuracy_floor(shape: tuple[int, ...], kind: str, cell_sd: float) -> float:
    """The fewest held-out customers N at which the accuracy's noise sd can be at most `MAX_SD`.

    sd² = s²/N² · (d(1 − a)² + (C − d)a²) for C cells of which d count as correct (module
    `analytic_sd`); its minimum over the accuracy a is at a = d/C, s²/N² · d(C − d)/C. So N must be at
    least s·√(d(C − d)/C) / MAX_SD, whatever the data: a scores histogram has d = C/2, a k-class
    confusion matrix d = k of C = k² cells."""
    cells = int(np.prod(shape))
    correct = cells / 2 if kind == "scores" else shape[0]
    return cell_sd * math.sqrt(correct * (cells - correct) / cells) / MAX_SD


def _class_reason(counts: np.ndarray, cell_sd: float, total: float) -> str:
    """Why the AUC is unreadable by its class counts, or '' when both are clear of the noise."""
    class_sd = cell_sd * math.sqrt(counts.shape[1])
    for label, name in ((1, "positives"), (0, "negatives")):
        count = float(counts[label].sum())
        if count <= MIN_SDS * class_sd:
            share = count / total if count > 0 and total > 0 else 0.0
            return (
                f"the held-out {name} {count:.0f} ± {class_sd:.0f} are within {MIN_SDS:g} noise sd of zero"
                + _more(count, MIN_SDS * class_sd, share, at_least=True)
            )
    return ""


def describe(key: str, band: Band, digits: int = 3) -> str:
    """One metric as people read it: "AUC 0.620 ± 0.040", "examples 392 ± 277", or
    "AUC unreadable (noise sd 0.31 > 0.1; needs ~3,600 more held-out customers)"."""
    name = LABELS.get(key, key)
    if not band.readable:
        return f"{name} unreadable ({band.reason})"
    if key == "examples":
        return f"{name} {band.value:.0f} ± {band.sd:.0f}"
    return f"{name} {band.value:.{digits}f} ± {band.sd:.{digits}f}"


DESCRIBED = ("accuracy", "macro_f1", "auc", "top3_accuracy", "loss", "examples")
"""The metrics a row, a report or a card describes, in this order."""


def describe_all(values: Mapping[str, Any], found: Mapping[str, Band], *, band95: bool = False) -> list[str]:
    """Each metric of `values` as people read it: with its band where `found` has one (`describe`;
    `band95` adds the 95% band), else its plain value ("undefined" where it is null). Counts are whole
    numbers."""
    lines = []
    for key in DESCRIBED:
        value, band = values.get(key), found.get(key)
        if band is not None:
            text = describe(key, band)
            if band95 and band.readable and key != "examples":
                text += f" (95% band {band.low:.3f} to {band.high:.3f})"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            name = LABELS.get(key, key)
            text = f"{name} {value:.0f}" if key == "examples" else f"{name} {value:.3f}"
        elif key in values:
            text = f"{LABELS.get(key, key)} undefined"
        else:
            continue
        lines.append(text)
    return lines
