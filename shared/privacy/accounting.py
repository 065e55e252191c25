"""RDP accounting of the Poisson-subsampled Gaussian mechanism (DP-SGD).

A privacy history is a list of `Charge`s: `steps` steps of DP-SGD with sampling rate `sample_rate`
and noise multiplier `noise_multiplier`. Its epsilon at `delta` is the RDP composition of every
charge converted to (ε, δ); this is exactly what Opacus's RDP accountant computes, so a ledger can
be recomputed by anyone from its history alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

from opacus.accountants.analysis import rdp as rdp_analysis

# Rényi orders: dense near 1 (large epsilons), integers above, up to 256 (strong noise, few steps).
# Any set of orders gives a valid bound; this one stays within 1% of dp-accounting's dense grid
# (tested) at about a third of the cost of Opacus's default grid, whose fractional orders are slow.
ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10 for x in range(1, 10)]  # 1.1 … 1.9
    + [2 + x / 4 for x in range(8)]  # 2 … 3.75
    + [4 + x / 2 for x in range(8)]  # 4 … 7.5
    + [8.0, 9.0, 10.0, 11.0, 12.0, 14.0, 16.0, 18.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 56.0, 64.0]
    + [80.0, 96.0, 128.0, 160.0, 192.0, 256.0]
)


@dataclass(frozen=True)
class Charge:
    """One round of DP-SGD at one merchant, as written to the ledger's history."""

    round: int
    run_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier <= 0.0:
            raise ValueError(f"noise_multiplier must be positive, got {self.noise_multiplier}")
        if self.steps < 0:
            raise ValueError(f"steps must be non-negative, got {self.steps}")

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Charge:
        try:
            return cls(
                round=int(data["round"]),  # type: ignore[call-overload]
                run_id=str(data["run_id"]),
                noise_multiplier=float(data["noise_multiplier"]),  # type: ignore[arg-type]
                sample_rate=float(data["sample_rate"]),  # type: ignore[arg-type]
                steps=int(data["steps"]),  # type: ignore[call-overload]
                max_grad_norm=float(data["max_grad_norm"]),  # type: ignore[arg-type]
            )
        except KeyError as missing:
            raise ValueError(f"ledger history entry lacks field {missing}: {data}") from None


def epsilon_of(history: Iterable[Charge], delta: float, orders: Sequence[float] = ORDERS) -> float:
    """Epsilon of the composition of every charge in `history` at `delta` (0 for an empty history)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    total = [0.0] * len(orders)
    any_steps = False
    for charge in history:
        if charge.steps == 0:
            continue
        any_steps = True
        # RDP composes additively, so one step's RDP (cached) times the number of steps
        rdp = _one_step_rdp(charge.sample_rate, charge.noise_multiplier, tuple(orders))
        total = [a + charge.steps * b for a, b in zip(total, rdp, strict=True)]
    if not any_steps:
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps) if math.isfinite(eps) else math.inf


@lru_cache(maxsize=4096)
def _one_step_rdp(
    sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]
) -> tuple[float, ...]:
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)
    return tuple(float(x) for x in rdp)
