"""What a merchant checks before it charges its ledger for a round: nothing here spends privacy.

* the incoming global adapter has exactly the adapter's keys and shapes, and finite values (a round
  trained on a malformed adapter would still be charged, and its update rejected);
* δ is well below 1/customers (DP at δ ≥ 1/N allows releasing one customer's data outright);
* the run stays within the merchant's `max-epsilon-per-run`, whatever horizon the coordinator asks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shared.adapters import AdapterSpec, OutgoingGuardError
from shared.privacy import BudgetExceededError, Charge, Ledger, epsilon_of

DELTA_FACTOR = 10  # δ must stay below 1/(DELTA_FACTOR · customers)


class RunBudgetExceededError(BudgetExceededError):
    """The charge would take this run past the merchant's max-epsilon-per-run."""

    def __str__(self) -> str:
        return (
            f"this run's privacy budget would be exceeded: ε {self.current:.3f} → {self.would_be:.3f} > "
            f"{self.max_epsilon:.3f} (earlier runs plus max-epsilon-per-run); the next run may continue"
        )


def incoming_problem(model: torch.nn.Module, adapter: Mapping[str, torch.Tensor]) -> str | None:
    """Why `adapter` may not be trained on (keys, shapes, dtype, non-finite values), or None."""
    try:
        AdapterSpec.of(model).check(adapter, what="incoming adapter")
    except OutgoingGuardError as err:
        return str(err)
    bad = sorted(k for k, v in adapter.items() if not bool(torch.isfinite(v).all()))
    if bad:
        return f"incoming adapter refused: non-finite values in {bad[:3]}{'…' if len(bad) > 3 else ''}"
    return None


def delta_problem(delta: float, customers: int) -> str | None:
    """Why `delta` is too large for `customers` training customers, or None."""
    limit = 1.0 / (DELTA_FACTOR * max(customers, 1))
    if delta >= limit:
        return (
            f"delta {delta:g} is not below 1/({DELTA_FACTOR}·{customers} customers) = {limit:.2g}: "
            f"set delta in the merchant settings to at most {limit / 10:.1g}"
        )
    return None


def run_epsilon_target(ledger: Ledger, *, run_id: str, max_epsilon_per_run: float | None) -> float:
    """The ε the ledger may reach by the end of run `run_id`: max-epsilon, capped at what the other
    runs spent plus max-epsilon-per-run (RDP does not add up, so "what a run spends" is its increase
    of the composed ε)."""
    if max_epsilon_per_run is None:
        return ledger.max_epsilon
    others = [c for c in ledger.history if c.run_id != run_id]
    spent = epsilon_of(others, ledger.delta, accountant=ledger.accountant)
    return min(ledger.max_epsilon, spent + max_epsilon_per_run)


def check_run_cap(ledger: Ledger, charge: Charge, target: float) -> None:
    """Raise `RunBudgetExceededError` if `charge` takes the ledger past this run's `target`."""
    would_be = ledger.epsilon_after(charge)
    if would_be > target:
        raise RunBudgetExceededError(current=ledger.epsilon, would_be=would_be, max_epsilon=target)
