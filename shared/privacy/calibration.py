"""Noise calibration: the smallest noise multiplier that keeps a planned horizon within budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from shared.privacy.accounting import DEFAULT_ACCOUNTANT, Charge, check_accountant, epsilon_of, segments
from shared.privacy.rdp import INTEGER_ORDERS, rdp_epsilon

LOWEST = 0.05
"""Smallest σ searched: below it every realistic plan's epsilon is far beyond any budget."""
CLOSE_ENOUGH = 2e-3
"""Stop once the plan's epsilon is within this fraction below the budget (or σ within it)."""
Point = tuple[float, float]  # (σ, its epsilon)


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
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """Noise multiplier σ such that `spent` plus `rounds` rounds of `steps_per_round` steps at
    `sample_rate` stays at or below `max_epsilon` under `accountant` (the ledger's own).

    Calibrating once for the whole horizon keeps σ constant across the run's rounds; the ledger
    still checks every round before it is charged. The answer is checked with exactly the function the
    ledger uses, so the last planned round never finds the budget a rounding error short. Raises
    `CalibrationError` when even σ=`upper` (an update that is almost pure noise) does not fit.
    """
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"need rounds ≥ 1 and steps_per_round ≥ 1, got {rounds} and {steps_per_round}")
    kind = check_accountant(accountant)

    def plan(sigma: float) -> list[Charge]:
        return [*spent, Charge(0, "plan", sigma, sample_rate, steps_per_round * rounds, 1.0)]

    def epsilon(sigma: float) -> float:
        return epsilon_of(plan(sigma), delta, accountant=kind)

    if epsilon(upper) > max_epsilon:
        raise CalibrationError(
            f"even noise multiplier {upper} would exceed max-epsilon {max_epsilon} over {rounds} rounds "
            f"(already spent ε={epsilon_of(spent, delta, accountant=kind):.3f}); raise max-epsilon, plan "
            "fewer rounds or use more customers per round"
        )
    if kind == "rdp":
        return _calibrate_rdp(plan, max_epsilon, delta, upper)
    # RDP on integer orders bounds PLD's epsilon from above, so its σ (found in ~0.1 s) fits and PLD's
    # is 5-15% below it: a few secant steps on PLD (~0.05 s an evaluation) instead of a bisection.
    start = _rdp_integer_orders(plan, max_epsilon, delta, upper)
    if start >= upper:  # RDP finds the earlier runs over budget already: start from the plan alone
        start = _rdp_integer_orders(lambda s: plan(s)[len(spent) :], max_epsilon, delta, upper)
    return _solve(epsilon, max_epsilon, *_bracket(epsilon, max_epsilon, start=start, upper=upper))


def _rdp_fits(
    plan: Callable[[float], list[Charge]], sigma: float, bound: float, delta: float, **kw: Any
) -> bool:
    return rdp_epsilon(segments(plan(sigma)), delta, **kw) <= bound


def _rdp_integer_orders(
    plan: Callable[[float], list[Charge]], max_epsilon: float, delta: float, upper: float
) -> float:
    """σ under RDP restricted to integer orders: fast, and its epsilon bounds the full grid's from above."""
    if not _rdp_fits(plan, upper, max_epsilon, delta, orders=INTEGER_ORDERS):
        return upper  # only the other accountant's check at `upper` passed; it refines from there
    return _bisect(
        lambda s: _rdp_fits(plan, s, max_epsilon, delta, orders=INTEGER_ORDERS), LOWEST, upper, 1e-3
    )


def _calibrate_rdp(
    plan: Callable[[float], list[Charge]], max_epsilon: float, delta: float, upper: float
) -> float:
    """RDP calibration: integer orders first, then a few steps on the full grid of orders (slow,
    fractional orders) to give back the few percent of budget the integer orders waste."""
    coarse = _rdp_integer_orders(plan, max_epsilon, delta, upper)
    return _bisect(lambda s: _rdp_fits(plan, s, max_epsilon, delta), 0.85 * coarse, coarse, 2e-3)


def _bracket(
    epsilon: Callable[[float], float], target: float, *, start: float, upper: float
) -> tuple[Point, Point]:
    """Two σ around the answer, (over budget, fits), found from `start` by jumps that assume ε falls
    like 1/σ (it falls at least that fast, unless earlier runs dominate it: then jumps are ×2 or ×1.25).
    `upper` was checked to fit, so the upward search ends."""
    point = (start, epsilon(start))
    if point[1] > target:
        low = point
        while True:
            sigma = min(upper, low[0] * max(1.25, low[1] / target))
            point = (sigma, epsilon(sigma))
            if point[1] <= target:
                return low, point
            low = point
    high = point
    while high[1] < target * (1 - CLOSE_ENOUGH) and high[0] >= LOWEST:
        ratio = high[1] / target
        sigma = high[0] * (max(0.5, ratio * (1 - CLOSE_ENOUGH / 2)) if ratio < 0.95 else 0.5)
        point = (sigma, epsilon(sigma))
        if point[1] > target:
            return point, high
        high = point
    return high, high  # close enough already (or at the bottom of the search range)


def _solve(epsilon: Callable[[float], float], target: float, low: Point, high: Point) -> float:
    """Smallest σ (to `CLOSE_ENOUGH`) with epsilon(σ) ≤ target, given low over budget and high fitting.

    Regula falsi on log ε against log σ (nearly linear there), with the Illinois fix so that neither end
    gets stuck, and bisection whenever a step would leave the bracket. Always returns a σ whose epsilon
    was checked to fit.
    """
    (s_low, e_low), (s_high, e_high) = low, high
    f_low, f_high = _log_ratio(e_low, target), _log_ratio(e_high, target)
    side = 0
    while s_high > s_low * (1 + CLOSE_ENOUGH) and e_high < target * (1 - CLOSE_ENOUGH):
        x_low, x_high = math.log(s_low), math.log(s_high)
        x = x_high - f_high * (x_high - x_low) / (f_high - f_low) if f_low != f_high else math.nan
        if not x_low < x < x_high:
            x = (x_low + x_high) / 2
        sigma = math.exp(x)
        eps = epsilon(sigma)
        if eps <= target:
            s_high, e_high, f_high = sigma, eps, _log_ratio(eps, target)
            f_low, side = (f_low / 2 if side == +1 else f_low), +1
        else:
            s_low, e_low, f_low = sigma, eps, _log_ratio(eps, target)
            f_high, side = (f_high / 2 if side == -1 else f_high), -1
    return s_high


def _log_ratio(eps: float, target: float) -> float:
    return math.log(max(eps, 1e-300) / target) if math.isfinite(eps) else 700.0
