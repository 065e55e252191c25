"""The merchant's privacy ledger: one JSON file on the merchant's own disk.

Format (a contract other tools read):

    {"merchant_id": "m1", "accountant": "pld", "privacy_unit": "customer",
     "delta": 1e-6, "max_epsilon": 8.0, "epsilon": 3.21,
     "history": [{"round": 1, "run_id": "…", "noise_multiplier": 0.91, "sample_rate": 0.0125,
                  "steps": 80, "max_grad_norm": 1.0}]}

`epsilon` is always recomputed from `history` with the ledger's `accountant` (`pld` or `rdp`,
`shared.privacy.accounting.epsilon_of`), never trusted from the file. A ledger keeps the accountant
it was started with: continuing it with another is refused, as Opacus refuses a mismatched
accountant state. `privacy_unit` is what one neighbouring dataset differs by: `customer`, or `session`
for sources that have no customer id (YooChoose). Writes are atomic (temp file, fsync, rename) and
serialised by an advisory lock, so a crash leaves either the old or the new ledger, and a charge that
was written stays written across restarts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.fileio import atomic_write_json
from shared.privacy.accounting import DEFAULT_ACCOUNTANT, Charge, check_accountant, epsilon_of
from shared.privacy.units import DEFAULT_UNIT, check_unit, weaker_unit


class BudgetExceededError(RuntimeError):
    """The requested charge would take the merchant past its max-epsilon."""

    def __init__(self, *, current: float, would_be: float, max_epsilon: float) -> None:
        super().__init__(
            f"privacy budget would be exceeded: ε {current:.3f} → {would_be:.3f} > max-epsilon {max_epsilon}"
        )
        self.current = current
        self.would_be = would_be
        self.max_epsilon = max_epsilon


@dataclass
class Ledger:
    """In-memory view of a ledger file. Use `Ledger.open(path, ...)` and `charge(...)`."""

    path: Path
    merchant_id: str
    delta: float
    max_epsilon: float
    history: list[Charge] = field(default_factory=list)
    accountant: str = DEFAULT_ACCOUNTANT
    privacy_unit: str = DEFAULT_UNIT
    _depth: int = field(default=0, repr=False, compare=False)

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, accountant=self.accountant)

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        merchant_id: str,
        delta: float,
        max_epsilon: float,
        accountant: str = DEFAULT_ACCOUNTANT,
        privacy_unit: str = DEFAULT_UNIT,
    ) -> Ledger:
        """Load the ledger at `path`, or start an empty one. Budget settings and the accountant come
        from the caller (the merchant's own settings), never from the file or the server;
        `privacy_unit` is that of the merchant's data (`shared.privacy.units`)."""
        path = Path(path)
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}; use e.g. 1e-6")
        if max_epsilon <= 0.0:
            raise ValueError(f"max-epsilon must be positive, got {max_epsilon}")
        check_accountant(accountant)
        unit = check_unit(privacy_unit)
        history: list[Charge] = []
        if path.exists():
            data = _read(path)
            if data.get("merchant_id") != merchant_id:
                raise ValueError(
                    f"ledger {path} belongs to merchant {data.get('merchant_id')!r}, not {merchant_id!r}; "
                    "point state-dir at this merchant's own folder"
                )
            history = _history(data, path)
            if history:  # an empty ledger has accounted nothing yet: any accountant may start it
                _check_same_accountant(data, accountant, path)
                # Past charges guaranteed only what their unit did: keep the weaker unit, never relabel up.
                unit = weaker_unit(str(data.get("privacy_unit", DEFAULT_UNIT)), unit)
        return cls(
            path=path,
            merchant_id=merchant_id,
            delta=delta,
            max_epsilon=max_epsilon,
            history=history,
            accountant=accountant,
            privacy_unit=unit,
        )

    def epsilon_after(self, charge: Charge) -> float:
        return epsilon_of([*self.history, charge], self.delta, accountant=self.accountant)

    def charge(self, charge: Charge) -> float:
        """Append `charge` and persist it, or raise `BudgetExceededError` and change nothing.

        Called *before* the noisy update is released: a crash after this point over-counts, never
        under-counts. The file is re-read under the lock so that two processes never lose a charge.
        """
        with self._locked():
            if self.path.exists():
                self.history = _history(_read(self.path), self.path)
            current = self.epsilon
            would_be = self.epsilon_after(charge)
            if would_be > self.max_epsilon:
                raise BudgetExceededError(current=current, would_be=would_be, max_epsilon=self.max_epsilon)
            self.history.append(charge)
            self._write()
        return would_be

    def save(self) -> None:
        """Write the ledger as it is (e.g. to create an empty one at `merchant init`)."""
        with self._locked():
            self._write()

    def to_json(self) -> dict[str, object]:
        return {
            "merchant_id": self.merchant_id,
            "accountant": self.accountant,
            "privacy_unit": self.privacy_unit,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "epsilon": self.epsilon,
            "history": [c.to_json() for c in self.history],
        }

    def reload(self) -> None:
        """Re-read the history from disk (call under `locked`)."""
        if self.path.exists():
            self.history = _history(_read(self.path), self.path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's advisory lock (re-entrant within this object): what a merchant counts
        beside the ledger (its run book) is read and written under it too."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(self.path.suffix + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                fcntl.flock(lock, fcntl.LOCK_UN)

    _locked = locked

    def _write(self) -> None:
        atomic_write_json(self.path, self.to_json())


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"ledger {path} is not valid JSON ({err}); restore it from backup, never delete it"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"ledger {path} must hold a JSON object")
    return data


def _check_same_accountant(data: dict[str, object], accountant: str, path: Path) -> None:
    """A ledger's epsilon is defined by its accountant: switching would change past spending."""
    written = data.get("accountant")
    if written != accountant:
        raise ValueError(
            f"ledger {path} was written with the {written!r} accountant, but this merchant's settings ask "
            f"for {accountant!r}; a ledger is continued with the accountant it started with: set "
            f"accountant = {written!r} in merchant.toml (or FEDBEHAVIOR_MERCHANT_ACCOUNTANT={written})"
        )


def _history(data: dict[str, object], path: Path) -> list[Charge]:
    entries = data.get("history", [])
    if not isinstance(entries, list):
        raise ValueError(f"ledger {path}: `history` must be a list of charges")
    return [Charge.from_json(entry) for entry in entries]
