"""Noise calibration: the smallest noise multiplier that keeps a planned horizon within budget."""

from __future__ import annotations

from collections.abc import Sequence

from shared.privacy.accounting import Charge, epsilon_of


class CalibrationError(ValueError):
    """No noise multiplier up to the search limit fits the plan into the remaining budget."""


def calibrate_noise(
    *,
    spent: Sequence[Charge],
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    max_epsilon: float,
    delta: float,
    upper: float = 200.0,
    tolerance: float = 1e-3,
) -> float:
    """Noise multiplier σ such that `spent` plus `rounds` rounds of `steps_per_round` steps at
    `sample_rate` stays at or below `max_epsilon` (binary search on σ, monotone in ε).

    Calibrating once for the whole horizon keeps σ constant across the run's rounds; the ledger
    still checks every round before it is charged.
    """
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"need rounds ≥ 1 and steps_per_round ≥ 1, got {rounds} and {steps_per_round}")

    def eps(sigma: float) -> float:
        planned = Charge(0, "plan", sigma, sample_rate, steps_per_round * rounds, 1.0)
        return epsilon_of([*spent, planned], delta)

    if eps(upper) > max_epsilon:
        raise CalibrationError(
            f"even noise multiplier {upper} would exceed max-epsilon {max_epsilon} over {rounds} rounds "
            f"(already spent ε={epsilon_of(spent, delta):.3f}); raise max-epsilon, plan fewer rounds or "
            "use more customers per round"
        )
    low, high = 0.05, upper
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if eps(mid) > max_epsilon:
            low = mid
        else:
            high = mid
    return high
