"""Label builders: from a merchant's clean events to (prefix events, label) candidates.

Every task is built so that the input never contains what it predicts:

* ``purchase-intent`` (binary): the prefix is the first k events, k drawn from a hash of the session
  id, stopped early at the first event whose role reveals the label (`leak-roles`, default cart and
  buy; a shop maps its shipping/payment steps to cart). The label is whether the session contains a
  buy. The prefix holds no such event.
* ``next-behavior`` (multi-class): the prefix is the first k events (k hashed as above); the label is
  the behaviour of event k. Sessions with no event k yield no example.
* ``category-intent`` (multi-class, top-k): the prefix is the first k events; the label is the
  category of the next item the customer acts on (the recommendation use case), from a label list
  fixed in the run config, "other" for the rest.
* ``customer-label`` and ``repeat-purchase``: one example per customer (or labelled session) from
  the customer's recent events; see `shared.customer_tasks`. `shared.candidates.build_candidates`
  runs whichever a task names.

The cut k never depends on the session's length or anything after the cut: a cut drawn from the
length would leak the future (shopping sessions are longer because they go on to cart and buy).

The privacy unit is the customer: `one_per_customer` keeps at most one example per customer, drawn
afresh each round, and customers are split once into training and held-out evaluation customers.
`up_to_k_per_customer` keeps up to k per customer for customer-level DP-SGD, which clips the sum of
each customer's gradients as one (client/training/customer_dp.py), so the unit stays one customer.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from shared.schema import FUNNEL_BEHAVIORS, Behavior, Event


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: its name and label names (index = label id)."""

    name: str
    labels: tuple[str, ...]
    leak_roles: tuple[str, ...] = tuple(b.value for b in FUNNEL_BEHAVIORS)  # purchase-intent's stop roles
    repeat_days: float = 30.0  # repeat-purchase's window after the first purchase

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_binary(self) -> bool:
        return self.num_labels == 2


TASKS: dict[str, TaskSpec] = {
    "purchase-intent": TaskSpec("purchase-intent", ("no-buy", "buy")),
    "next-behavior": TaskSpec("next-behavior", tuple(b.value for b in Behavior)),
}
TASK_NAMES = (*TASKS, "category-intent", "customer-label", "repeat-purchase")
CUSTOMER_TASKS = ("customer-label", "repeat-purchase")
"""Tasks whose example is a customer's (or a labelled session's) events, not a session prefix."""

# The label space of category-intent must be the same at every merchant, so it is part of the run
# config (a public taxonomy), never learnt from any merchant's data. Categories outside it are "other".
DEFAULT_CATEGORIES = ("phones", "laptops", "shoes", "beauty", "home", "books", "snacks", "toys")
OTHER = "other"


def get_task(
    name: str,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    *,
    customer_labels: Sequence[str] = (),
    leak_roles: Sequence[str] = (),
    repeat_days: float = 30.0,
) -> TaskSpec:
    """The task called `name`, or a clear error listing the known tasks. `customer_labels`: the
    label names of customer-label (fixed in the run config, like category-intent's); `leak_roles`:
    the roles that end a purchase-intent prefix (default cart, buy)."""
    roles = tuple(leak_roles) or tuple(b.value for b in FUNNEL_BEHAVIORS)
    unknown = [r for r in roles if r not in {b.value for b in Behavior}]
    if unknown:
        known = ", ".join(b.value for b in Behavior)
        raise ValueError(f"leak-roles: {unknown[0]!r} is not a funnel role; use some of {known}")
    if name == "customer-label":
        if len(customer_labels) < 2 or len(set(customer_labels)) != len(customer_labels):
            raise ValueError(
                "customer-label needs customer-labels: at least two distinct label names in the run "
                f'config (e.g. customer-labels = "loyal,at-risk,churned"), got {list(customer_labels)}'
            )
        return TaskSpec(name, tuple(customer_labels))
    if name == "repeat-purchase":
        if not repeat_days > 0:
            raise ValueError(f"repeat-days must be positive, got {repeat_days}")
        return TaskSpec(name, ("no-repeat", "repeat"), repeat_days=float(repeat_days))
    if name == "purchase-intent":
        return TaskSpec(name, TASKS[name].labels, leak_roles=roles)
    if name == "category-intent":
        if not categories or OTHER in categories or len(set(categories)) != len(categories):
            raise ValueError(f"category-labels must be distinct, non-empty and not {OTHER!r}: {categories}")
        return TaskSpec(name, (*categories, OTHER))
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}") from None


@dataclass(frozen=True)
class Candidate:
    """A possible example: the events the model sees and the label it must predict."""

    customer_id: str
    session_id: str
    prefix: tuple[Event, ...]
    label: int
    ends_at: datetime | None = None  # time of the session's last event: the label may use events up to it


@dataclass
class TaskStats:
    """How many sessions became candidates and why the others did not."""

    sessions: int = 0
    candidates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process (Python's `hash` is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def sessions_of(events: Iterable[Event]) -> dict[tuple[str, str], list[Event]]:
    """Events grouped by (customer, session), each group in time order."""
    grouped: dict[tuple[str, str], list[Event]] = defaultdict(list)
    for event in events:
        grouped[(event.customer_id, event.session_id)].append(event)
    for group in grouped.values():
        group.sort(key=lambda e: e.timestamp)
    return dict(grouped)


PURCHASE_CUT = (3, 10)
NEXT_CUT = (1, 6)


def _cut_position(session_id: str, low: int, high: int) -> int:
    """A cut in [low, high] drawn from the session id only: blind to the label and to the future."""
    return low + stable_hash("cut", session_id) % (high - low + 1)


def purchase_intent(
    session: Sequence[Event], task: TaskSpec | None = None
) -> tuple[tuple[Event, ...], int] | str:
    """(prefix, label) for one session, or the reason it yields no example."""
    cut = _cut_position(session[0].session_id, *PURCHASE_CUT)
    stop = set((task or TASKS["purchase-intent"]).leak_roles) | {Behavior.BUY.value}  # buy is the label
    first_funnel = next((i for i, e in enumerate(session) if e.behavior.value in stop), len(session))
    prefix = tuple(session[: min(cut, first_funnel)])
    if not prefix:
        return "starts-with-cart-or-buy"
    return prefix, int(any(e.behavior is Behavior.BUY for e in session))


_BEHAVIOR_INDEX = {b: i for i, b in enumerate(Behavior)}


def next_behavior(
    session: Sequence[Event], task: TaskSpec | None = None
) -> tuple[tuple[Event, ...], int] | str:
    """(prefix, label) for one session, or the reason it yields no example."""
    t = _cut_position(session[0].session_id, *NEXT_CUT)
    if t >= len(session):
        return "session-shorter-than-cut"
    return tuple(session[:t]), _BEHAVIOR_INDEX[session[t].behavior]


def category_intent(
    session: Sequence[Event], task: TaskSpec | None = None
) -> tuple[tuple[Event, ...], int] | str:
    """(prefix, label): the category of the first item the customer acts on after the first k
    events (k hashed as for next-behavior); categories outside the task's labels are "other"."""
    t = _cut_position(session[0].session_id, *NEXT_CUT)
    if t >= len(session):
        return "session-shorter-than-cut"
    category = next((e.category for e in session[t:] if e.category), None)
    if category is None:
        return "no-category-after-cut"
    labels = (task or get_task("category-intent")).labels
    return tuple(session[:t]), labels.index(category) if category in labels[:-1] else len(labels) - 1


def split_customers(
    customers: Iterable[str], *, eval_fraction: float, salt: str
) -> tuple[list[str], list[str]]:
    """Split customers (not examples) into training and held-out evaluation sets, stably."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    threshold = int(eval_fraction * 2**64)
    train: list[str] = []
    held_out: list[str] = []
    for customer in sorted(set(customers)):
        (held_out if stable_hash("split", salt, customer) < threshold else train).append(customer)
    return train, held_out


def one_per_customer(
    candidates: dict[str, list[Candidate]], customers: Iterable[str], *, round_seed: object
) -> list[Candidate]:
    """At most one candidate per customer: the privacy unit of every round's training set."""
    chosen = []
    for customer in sorted(set(customers)):  # a repeated customer must never yield two examples
        options = candidates.get(customer)
        if options:
            chosen.append(options[stable_hash("pick", round_seed, customer) % len(options)])
    return chosen


def up_to_k_per_customer(
    candidates: dict[str, list[Candidate]], customers: Iterable[str], *, k: int, round_seed: object
) -> list[Candidate]:
    """At most `k` distinct candidates per customer, grouped by customer (customers sorted).

    For customer-level DP-SGD: the privacy unit is still one customer, whose examples are summed into
    one clipped gradient. The first pick is `one_per_customer`'s (so k=1 is exactly that), the others
    follow in an order hashed from (round seed, customer, session): stable across processes, fresh
    every round, and blind to labels.
    """
    if k < 1:
        raise ValueError(f"examples-per-customer must be at least 1, got {k}")
    chosen: list[Candidate] = []
    for customer in sorted(set(customers)):
        options = candidates.get(customer)
        if not options:
            continue
        first = stable_hash("pick", round_seed, customer) % len(options)
        rest = sorted(
            (i for i in range(len(options)) if i != first),
            key=lambda i: stable_hash("pick-more", round_seed, customer, options[i].session_id, i),
        )
        chosen.extend(options[i] for i in [first, *rest][:k])
    return chosen


def split_by_time(
    candidates: dict[str, list[Candidate]], *, cutoff: datetime, eval_fraction: float, salt: str
) -> tuple[dict[str, list[Candidate]], dict[str, list[Candidate]]]:
    """Split by customer and at a public cut-off time (the run config's `eval-cutoff`).

    Held-out customers are drawn by the customer hash as in `split_customers` (about
    `eval_fraction` of customers) and keep only their sessions that start at or after `cutoff`;
    training customers keep only sessions that end before it. So no event at or after the cut-off
    reaches training, neither as input nor as label, and no customer is in both sets. Nothing here
    is learnt from the merchant's data: a customer's examples depend on that customer's sessions,
    the salt and the cut-off only, whoever else is in the data.
    """
    if cutoff.tzinfo is None:
        raise ValueError(f"cutoff must carry a time zone (event times are UTC), got {cutoff.isoformat()}")
    train_ids, eval_ids = split_customers(candidates, eval_fraction=eval_fraction, salt=salt)
    train: dict[str, list[Candidate]] = {}
    held_out: dict[str, list[Candidate]] = {}
    for customer in train_ids:
        before = [c for c in candidates[customer] if c.ends_at is not None and c.ends_at < cutoff]
        if before:
            train[customer] = before
    for customer in eval_ids:
        after = [c for c in candidates[customer] if c.prefix[0].timestamp >= cutoff]
        if after:
            held_out[customer] = after
    return train, held_out
