"""Noise calibration: the smallest noise multiplier that keeps a planned horizon within budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from shared.privacy.accounting import ORDERS, Charge, epsilon_of

INTEGER_ORDERS = tuple(o for o in ORDERS if float(o).is_integer())


class CalibrationError(ValueError):
    """No noise multiplier up to the search limit fits the plan into the remaining budget."""


def _bisect(fits: Callable[[float], bool], low: float, high: float, tolerance: float) -> float:
    """Smallest σ in [low, high] (to a relative `tolerance`) with fits(σ), given fits(high)."""
    while high > low * (1 + tolerance):
        mid = math.sqrt(low * high)  # bisection in log space
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


def calibrate_noise(
    *,
    spent: Sequence[Charge],
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    max_epsilon: float,
    delta: float,
    upper: float = 50.0,
) -> float:
    """Noise multiplier σ such that `spent` plus `rounds` rounds of `steps_per_round` steps at
    `sample_rate` stays at or below `max_epsilon`.

    Calibrating once for the whole horizon keeps σ constant across the run's rounds; the ledger
    still checks every round before it is charged. Raises `CalibrationError` when even σ=`upper`
    (an update that is almost pure noise) does not fit.
    """
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"need rounds ≥ 1 and steps_per_round ≥ 1, got {rounds} and {steps_per_round}")

    def fits(sigma: float, orders: Sequence[float] = ORDERS) -> bool:
        planned = Charge(0, "plan", sigma, sample_rate, steps_per_round * rounds, 1.0)
        return epsilon_of([*spent, planned], delta, orders=orders) <= max_epsilon

    if not fits(upper):
        raise CalibrationError(
            f"even noise multiplier {upper} would exceed max-epsilon {max_epsilon} over {rounds} rounds "
            f"(already spent ε={epsilon_of(spent, delta):.3f}); raise max-epsilon, plan fewer rounds or "
            "use more customers per round"
        )
    # Integer orders first (fast, and their epsilon bounds the full grid's from above), then a few
    # steps on the full grid of orders to give back the few percent of budget they waste.
    coarse = _bisect(lambda s: fits(s, INTEGER_ORDERS), 0.05, upper, 1e-3)
    return _bisect(fits, 0.85 * coarse, coarse, 2e-3)
