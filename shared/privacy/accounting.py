"""Privacy accounting of DP-SGD histories: the `Charge` record and its epsilon under either accountant.

A privacy history is a list of `Charge`s: `steps` steps of DP-SGD (Poisson-subsampled Gaussian) with
sampling rate `sample_rate` and noise multiplier `noise_multiplier`. Its epsilon at `delta` is the
composition of every charge under one accountant:

- `pld` (default): the privacy-loss distribution, pessimistically discretised (`shared.privacy.pld`);
  the tightest of the two, about 10% below RDP at the same noise;
- `rdp`: Rényi DP, as Opacus's RDP accountant computes it (`shared.privacy.rdp`).

Charges with the same (σ, q) are one mechanism applied `steps` times in total, so they are merged
before composing: the epsilon depends on the history alone (not on how it was split into rounds, runs
or files), and anyone can recompute a ledger's number from its `history` with `epsilon_of`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from shared.privacy.pld import pld_epsilon
from shared.privacy.rdp import ORDERS, rdp_epsilon

Accountant = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)
DEFAULT_ACCOUNTANT: Accountant = "pld"

__all__ = ["ACCOUNTANTS", "DEFAULT_ACCOUNTANT", "ORDERS", "Accountant", "Charge", "epsilon_of", "segments"]


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
        if not 0.0 < self.noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be positive and finite, got {self.noise_multiplier}")
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


def segments(history: Iterable[Charge]) -> list[tuple[float, float, int]]:
    """`(noise_multiplier, sample_rate, steps)` per distinct mechanism, steps summed, sorted.

    The clip norm is not part of the key: σ is relative to it, so the privacy loss does not depend on it.
    """
    steps: dict[tuple[float, float], int] = defaultdict(int)
    for charge in history:
        if charge.steps > 0:
            steps[(charge.noise_multiplier, charge.sample_rate)] += charge.steps
    return sorted((sigma, q, n) for (sigma, q), n in steps.items())


def check_accountant(name: str) -> Accountant:
    """`name` if it is a known accountant, else a ValueError that names the choices."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}")
    return name  # type: ignore[return-value]


def epsilon_of(history: Iterable[Charge], delta: float, *, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon of the composition of every charge in `history` at `delta` (0 for an empty history),
    under `accountant` (`pld` or `rdp`: a ledger's own `accountant` field says which)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    kind = check_accountant(accountant)
    parts = segments(history)
    if not parts:
        return 0.0
    return pld_epsilon(parts, delta) if kind == "pld" else rdp_epsilon(parts, delta)
