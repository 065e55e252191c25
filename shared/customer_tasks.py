"""Customer-level tasks: one example per customer (or per labelled session) from its recent events.

* ``customer-label``: the merchant's own labels (segment, fraud/risk, churn: the seeds' "behaviour
  pattern recognition"), from a labels file keyed by customer_id, or by session_id for session
  labels. The example is the customer's events (the serializer keeps the most recent that fit), or
  the labelled session's events. Label names are fixed in the run config (`customer-labels`), so every
  merchant shares one label space; rows outside it are quarantined by `client.ingest.labels`.
* ``repeat-purchase``: does a customer who bought buy again within N days (`repeat-days`)? The input
  is the customer's events up to and including the first purchase; the label is whether another
  buy-role event follows within N days. The example's `ends_at` is the end of that window, so a time
  split (`eval-split=time`) trains only on windows that closed before the cut-off: no future in
  training. Windows that run past the end of the export count as "no repeat" (right-censoring): with
  `eval-split=customer`, set the export's end at least N days after the last first purchase you want
  counted, or use the time split.

Both keep the privacy unit: every example belongs to exactly one customer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from shared.schema import Behavior, Event
from shared.tasks import Candidate, TaskSpec, TaskStats, sessions_of


@dataclass(frozen=True)
class LabelSet:
    """Validated labels: label index by customer, and by (customer, session) for session labels."""

    by_customer: Mapping[str, int] = field(default_factory=dict)
    by_session: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.by_customer) + len(self.by_session)


def build_customer_candidates(
    task: TaskSpec, events: Iterable[Event], *, labels: object = None
) -> tuple[dict[str, list[Candidate]], TaskStats]:
    """Candidates of a customer-level task, grouped by customer, with counts of skipped customers."""
    by_customer: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_customer[event.customer_id].append(event)
    for group in by_customer.values():
        group.sort(key=lambda e: (e.timestamp, e.session_id))
    if task.name == "repeat-purchase":
        return _repeat_purchase(task, by_customer)
    if not isinstance(labels, LabelSet):
        raise ValueError(
            "customer-label needs the merchant's labels: put labels.csv (customer_id,label or "
            "customer_id,session_id,label) in the data folder, or ingest it with --labels"
        )
    return _customer_label(by_customer, labels)


def _customer_label(
    by_customer: dict[str, list[Event]], labels: LabelSet
) -> tuple[dict[str, list[Candidate]], TaskStats]:
    out: dict[str, list[Candidate]] = {}
    stats = TaskStats()
    for customer, events in sorted(by_customer.items()):
        stats.sessions += 1
        found: list[Candidate] = []
        if customer in labels.by_customer:
            last = events[-1]
            found.append(
                Candidate(
                    customer, last.session_id, tuple(events), labels.by_customer[customer], last.timestamp
                )
            )
        for (cust, session_id), session in sorted(sessions_of(events).items()):
            label = labels.by_session.get((cust, session_id))
            if label is not None:
                found.append(Candidate(cust, session_id, tuple(session), label, session[-1].timestamp))
        if found:
            out[customer] = found
            stats.candidates += len(found)
        else:
            stats.skip("no-label")
    return out, stats


def _repeat_purchase(
    task: TaskSpec, by_customer: dict[str, list[Event]]
) -> tuple[dict[str, list[Candidate]], TaskStats]:
    window = timedelta(days=task.repeat_days)
    out: dict[str, list[Candidate]] = {}
    stats = TaskStats()
    for customer, events in sorted(by_customer.items()):
        stats.sessions += 1
        first = next((i for i, e in enumerate(events) if e.behavior is Behavior.BUY), None)
        if first is None:
            stats.skip("never-bought")
            continue
        bought_at = events[first].timestamp
        # the input: everything up to and including the first purchase (events at the same instant too)
        cut = first
        while cut + 1 < len(events) and events[cut + 1].timestamp == bought_at:
            cut += 1
        later = events[cut + 1 :]
        repeat = any(e.behavior is Behavior.BUY and e.timestamp <= bought_at + window for e in later)
        out[customer] = [
            Candidate(
                customer, events[first].session_id, tuple(events[: cut + 1]), int(repeat), bought_at + window
            )
        ]
        stats.candidates += 1
    return out, stats
