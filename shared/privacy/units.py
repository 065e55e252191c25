"""The privacy unit: what two neighbouring datasets differ by, as recorded in the ledger.

Each round's training set holds at most one example per customer, so the guarantee is per customer,
where the source has customers. YooChoose has none: its only id is the session, the ingest uses it as
the customer id, and the guarantee is then per *session* (one person with many sessions is many units).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

PrivacyUnit = Literal["customer", "session"]
PRIVACY_UNITS: tuple[str, ...] = get_args(PrivacyUnit)
DEFAULT_UNIT: PrivacyUnit = "customer"

SESSION_UNIT_FORMATS = frozenset({"yoochoose"})
"""Ingest formats whose customer id is a session id (`client.ingest.formats`)."""


def unit_of_format(fmt: str | None) -> PrivacyUnit:
    """The privacy unit of data ingested from source format `fmt` (None: not ingested, events.jsonl)."""
    return "session" if fmt in SESSION_UNIT_FORMATS else "customer"


def unit_of_ingest_report(path: Path) -> PrivacyUnit:
    """The privacy unit of a merchant's store, from the `format` in its ingest report at `path`.

    No report means the merchant's events come from `events.jsonl` (customer ids of its own).
    """
    if not path.exists():
        return DEFAULT_UNIT
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"ingest report {path} is not valid JSON ({err}); re-run `fedbehavior merchant ingest`"
        ) from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if not isinstance(fmt, str):
        raise ValueError(f"ingest report {path} has no `format`; re-run `fedbehavior merchant ingest`")
    return unit_of_format(fmt)


def weaker_unit(a: str, b: str) -> PrivacyUnit:
    """The weaker of two units: a history that mixes them only guarantees the weaker one (a guarantee
    per session says less about a person than one per customer)."""
    return "session" if "session" in (check_unit(a), check_unit(b)) else "customer"


def check_unit(name: str) -> PrivacyUnit:
    """`name` if it is a known privacy unit, else a ValueError that names the choices."""
    if name not in PRIVACY_UNITS:
        raise ValueError(f"unknown privacy unit {name!r}; use one of {', '.join(PRIVACY_UNITS)}")
    return name  # type: ignore[return-value]
