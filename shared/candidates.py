"""A merchant's candidates for any task: the session tasks' builders (`shared.tasks`) and the
customer tasks' (`shared.customer_tasks`), behind one call."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from shared.customer_tasks import build_customer_candidates
from shared.schema import Event
from shared.tasks import (
    CUSTOMER_TASKS,
    Candidate,
    TaskSpec,
    TaskStats,
    category_intent,
    next_behavior,
    purchase_intent,
    sessions_of,
)

_BUILDERS = {
    "purchase-intent": purchase_intent,
    "next-behavior": next_behavior,
    "category-intent": category_intent,
}


def build_candidates(
    task: TaskSpec, events: Iterable[Event], *, labels: object = None
) -> tuple[dict[str, list[Candidate]], TaskStats]:
    """All candidates of a merchant, grouped by customer, with counts of skipped sessions.
    `labels` (a `shared.customer_tasks.LabelSet`) is needed by customer-label only."""
    if task.name in CUSTOMER_TASKS:
        return build_customer_candidates(task, events, labels=labels)
    builder = _BUILDERS[task.name]
    by_customer: dict[str, list[Candidate]] = defaultdict(list)
    stats = TaskStats()
    for (customer, session_id), session in sorted(sessions_of(events).items()):
        stats.sessions += 1
        built = builder(session, task)
        if isinstance(built, str):
            stats.skip(built)
            continue
        prefix, label = built
        by_customer[customer].append(Candidate(customer, session_id, prefix, label, session[-1].timestamp))
        stats.candidates += 1
    return dict(by_customer), stats
