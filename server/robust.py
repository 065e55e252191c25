"""Robust aggregation primitives, as plain functions over tensors (no Flower).

The coordinator trusts nothing a merchant reports. Three bounds live here:

- `norm_bound`: an update whose distance from the global adapter exceeds `factor` x the round's median
  distance is rejected (a x100 update stands out against honest merchants trained the same way);
- `cap_weights`: a merchant's claimed example count is clipped to `factor` x the median claim, so a
  claim of 10⁹ weighs at most as much as a few typical merchants;
- `trimmed_mean` / `coordinate_median`: coordinate-wise aggregates in which a minority of arbitrary
  values (a sign-flipped update passes any norm bound) cannot move a coordinate outside the range of
  the honest values;
- `robust_trim_count`: the default aggregate's trim, at least one value at each end from three
  updates on, so that one merchant never sets a coordinate (with three, the median).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

# A median over fewer values is decided by a single merchant: below this, fall back to the history
# of earlier rounds or to the absolute bound.
MIN_UPDATES_FOR_MEDIAN = 3


def norm_bound(
    norms: Sequence[float],
    *,
    factor: float,
    absolute: float,
    history: Sequence[float] = (),
) -> tuple[float, float | None, str]:
    """(bound, reference median, where the reference came from) on update norms for one round.

    The reference is the median of this round's `norms` when there are at least
    `MIN_UPDATES_FOR_MEDIAN` of them ("round"), else the median of the references of earlier
    rounds ("history"), else there is none ("absolute"). The bound is `factor` x reference, never
    above `absolute`: the ceiling that holds even when every merchant of a small round is hostile.
    """
    if factor <= 0 or absolute <= 0:
        raise ValueError(f"norm bound needs a positive factor and ceiling, got {factor} and {absolute}")
    finite = [n for n in norms if math.isfinite(n)]
    if len(finite) >= MIN_UPDATES_FOR_MEDIAN and statistics.median(finite) > 0:
        reference = float(statistics.median(finite))
        return min(absolute, factor * reference), reference, "round"
    past = [h for h in history if math.isfinite(h) and h > 0]
    if past:
        reference = float(statistics.median(past))
        return min(absolute, factor * reference), reference, "history"
    return absolute, None, "absolute"


def cap_weights(claims: Sequence[float], *, factor: float) -> list[float]:
    """Each claimed example count clipped to `factor` x the median claim (claims must be positive).

    Why the median: it is set by the honest majority, so one merchant cannot raise its own cap.
    """
    if factor < 1:
        raise ValueError(f"max-weight-factor must be at least 1, got {factor}")
    if not claims:
        return []
    if min(claims) <= 0 or not all(math.isfinite(c) for c in claims):
        raise ValueError(f"example claims must be positive and finite, got {list(claims)}")
    cap = factor * float(statistics.median(claims))
    return [min(float(c), cap) for c in claims]


def trim_count(n: int, trim_fraction: float) -> int:
    """How many values are dropped at each end: ⌊trim_fraction·n⌋ (scipy's `trim_mean` convention),
    reduced so that at least one value remains."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim-fraction must be in [0, 0.5), got {trim_fraction}")
    k = math.floor(trim_fraction * n + 1e-9)  # 1e-9: 0.29·100 is 28.999… in floating point
    return min(k, (n - 1) // 2)


def robust_trim_count(n: int, trim_fraction: float) -> int:
    """The default aggregate's trim: `trim_count`, but at least 1 once there are three values, so a
    single merchant's value is always among those dropped when it is extreme in a coordinate."""
    k = trim_count(n, trim_fraction)
    return max(k, 1) if n >= MIN_UPDATES_FOR_MEDIAN else k


def trimmed_mean(
    values: Sequence[torch.Tensor], trim_fraction: float, *, at_least_one: bool = False
) -> torch.Tensor:
    """Coordinate-wise mean after dropping the `trim_count` smallest and largest values (float64);
    `at_least_one`: `robust_trim_count` instead."""
    stacked = _stack(values)
    n = stacked.shape[0]
    k = robust_trim_count(n, trim_fraction) if at_least_one else trim_count(n, trim_fraction)
    ordered = stacked.sort(dim=0).values
    return ordered[k : stacked.shape[0] - k].mean(dim=0)


def coordinate_median(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median (mean of the two middle values for an even count), float64.

    Sorting instead of `torch.quantile`, which refuses inputs above 16M elements.
    """
    stacked = _stack(values)
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def _stack(values: Sequence[torch.Tensor]) -> torch.Tensor:
    if not values:
        raise ValueError("robust aggregation needs at least one value")
    return torch.stack([v.to(torch.float64) for v in values])
