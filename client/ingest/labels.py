"""The merchant's own labels for the `customer-label` task: read, validate, quarantine.

`labels.csv` (or `.csv.gz`, …) in the merchant's data folder, with a header and the columns
`customer_id,label` (one label per customer) or `customer_id,session_id,label` / `session_id,label`
(one label per session). Every row is either used or quarantined to `labels-quarantine.jsonl` in the
state folder with its line number and reason, and the counts are in the returned report:

- `missing_label`, `missing_key`: an empty label or an empty customer/session id;
- `unknown_label`: a label outside the run config's `customer-labels` (the label space every merchant
  shares; a merchant's private label names never widen it);
- `unknown_customer`, `unknown_session`: no such customer/session in the merchant's events;
- `ambiguous_session`: a session id alone that several customers use (add a customer_id column);
- `duplicate`: a second label for the same key (the first one is kept).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.ingest.sources import open_source
from shared.customer_tasks import LabelSet
from shared.fileio import atomic_write_bytes
from shared.schema import Event

log = logging.getLogger(__name__)

LABELS_FILES = ("labels.csv", "labels.csv.gz", "labels.csv.bz2", "labels.csv.zst")
QUARANTINE_FILE = "labels-quarantine.jsonl"


class LabelsError(ValueError):
    """The labels file cannot be used at all (missing, or without the needed columns)."""


@dataclass
class LabelReport:
    total: int = 0
    good: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def find_labels(data_dir: Path) -> Path:
    """The labels file of a data folder, or an error saying where to put it."""
    for name in LABELS_FILES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise LabelsError(
        f"task customer-label needs {LABELS_FILES[0]} in the data folder {data_dir} (columns "
        "customer_id,label or customer_id,session_id,label); write it there or ingest it with --labels"
    )


def check_header(path: Path) -> list[str]:
    """The header of a labels file, checked: a label column and a customer_id and/or session_id."""
    with open_source(path) as handle:
        text = handle.readline().decode("utf-8-sig", "replace").strip()
    names = [n.strip() for n in next(csv.reader([text]), [])]
    if "label" not in names or not {"customer_id", "session_id"} & set(names):
        raise LabelsError(
            f"{path.name}: the header must have a label column and customer_id and/or session_id; "
            f"found {text!r}"
        )
    return names


def load_labels(
    path: Path, events: Iterable[Event], label_names: Sequence[str], quarantine_dir: Path
) -> tuple[LabelSet, LabelReport]:
    """Labels of `path` as label indices into `label_names`; bad rows quarantined with a reason."""
    check_header(path)
    sessions: dict[str, set[str]] = {}
    customers: set[str] = set()
    for event in events:
        customers.add(event.customer_id)
        sessions.setdefault(event.session_id, set()).add(event.customer_id)
    index = {name: i for i, name in enumerate(label_names)}
    by_customer: dict[str, int] = {}
    by_session: dict[tuple[str, str], int] = {}
    report, bad = LabelReport(), []
    seen: set[tuple[str, ...]] = set()
    with open_source(path) as handle:
        reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8-sig", errors="replace"))
        for line, row in enumerate(reader, start=2):
            report.total += 1
            reason, key = _check(row, index, customers, sessions)
            if key is not None and key in seen:
                reason = "duplicate"  # the first label of a key is kept
            elif key is not None:
                seen.add(key)
                label = index[(row.get("label") or "").strip()]
                if len(key) == 2:
                    by_session[(key[0], key[1])] = label
                else:
                    by_customer[key[0]] = label
            if reason is not None:
                bad.append({"line": line, "reason": reason, "row": row})
    counts = Counter(str(b["reason"]) for b in bad)
    report.quarantined, report.good, report.reasons = len(bad), report.total - len(bad), dict(counts)
    lines = "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad)
    atomic_write_bytes(quarantine_dir / QUARANTINE_FILE, lines.encode("utf-8"))
    if bad:
        log.warning(
            "%d of %d label rows quarantined to %s: %s", len(bad), report.total, QUARANTINE_FILE, counts
        )
    return LabelSet(by_customer, by_session), report


def _check(
    row: dict[str, str | None], index: dict[str, int], customers: set[str], sessions: dict[str, set[str]]
) -> tuple[str | None, tuple[str, ...] | None]:
    """(reason, None) for a bad row; (None, key) for a good one: (customer,) or (customer, session)."""
    label = (row.get("label") or "").strip()
    customer = (row.get("customer_id") or "").strip()
    session = (row.get("session_id") or "").strip()
    if not label:
        return "missing_label", None
    if not customer and not session:
        return "missing_key", None
    if label not in index:
        return "unknown_label", None
    if customer and customer not in customers:
        return "unknown_customer", None
    if not session:
        return None, (customer,)
    owners = sessions.get(session, set())
    if customer:
        return (None, (customer, session)) if customer in owners else ("unknown_session", None)
    if not owners:
        return "unknown_session", None
    if len(owners) > 1:
        return "ambiguous_session", None
    return None, (next(iter(owners)), session)
