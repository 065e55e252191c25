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

from opacus.accountants.analysis import rdp as rdp_analysis

# Opacus's default orders (dense near 1 for large epsilons) extended up to 256, where the optimum
# lies for strong noise and few steps; more orders can only tighten the bound.
ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 160, 192, 256]
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
        rdp = rdp_analysis.compute_rdp(
            q=charge.sample_rate, noise_multiplier=charge.noise_multiplier, steps=charge.steps, orders=orders
        )
        total = [a + float(b) for a, b in zip(total, rdp, strict=True)]
    if not any_steps:
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps) if math.isfinite(eps) else math.inf
