"""Tests of shared/tasks.py: label builders (no leakage), per-customer sampling, customer and time
splits."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.candidates import build_candidates
from shared.schema import FUNNEL_BEHAVIORS, Behavior, Event
from shared.tasks import (
    NEXT_CUT,
    PURCHASE_CUT,
    TASKS,
    Candidate,
    _cut_position,
    get_task,
    next_behavior,
    one_per_customer,
    purchase_intent,
    split_by_time,
    split_customers,
    stable_hash,
)

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
NON_FUNNEL = [b for b in Behavior if b not in FUNNEL_BEHAVIORS]
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def make_event(
    behavior: Behavior, i: int, *, session_id: str = "s", customer_id: str = "c", variant: int = 0
) -> Event:
    """A valid event of `behavior` at minute `i`; `variant` changes its optional fields."""
    values: dict[str, object] = {
        "customer_id": customer_id,
        "session_id": session_id,
        "timestamp": T0 + timedelta(minutes=i),
        "behavior": behavior,
        "title": f"title-{variant}",
        "price": float(variant),
    }
    if behavior is Behavior.SEARCH:
        values["query"] = f"q{i}-{variant}"
    else:
        values["item_id"] = f"item{i}-{variant}"
    if behavior is Behavior.REVIEW:
        values["rating"] = 1 + variant % 5
    return Event.model_validate(values)


def make_session(behaviors: list[Behavior], session_id: str = "s", customer_id: str = "c") -> list[Event]:
    return [make_event(b, i, session_id=session_id, customer_id=customer_id) for i, b in enumerate(behaviors)]


behaviors_st = st.lists(st.sampled_from(list(Behavior)), min_size=1, max_size=20)
session_id_st = st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=12)


# --- purchase-intent ------------------------------------------------------------------------------


@SETTINGS
@given(behaviors=behaviors_st, session_id=session_id_st)
def test_purchase_intent_prefix_has_no_funnel_event(behaviors: list[Behavior], session_id: str) -> None:
    session = make_session(behaviors, session_id)
    built = purchase_intent(session)
    if isinstance(built, str):
        assert behaviors[0] in FUNNEL_BEHAVIORS
        assert built == "starts-with-cart-or-buy"
        return
    prefix, label = built
    assert 1 <= len(prefix) <= len(session)
    assert list(prefix) == session[: len(prefix)]
    assert all(e.behavior not in FUNNEL_BEHAVIORS for e in prefix)
    assert label == int(Behavior.BUY in behaviors)
    # the cut comes from the session id alone, stopped early by the first cart/buy or the session's end
    first_funnel = next((i for i, b in enumerate(behaviors) if b in FUNNEL_BEHAVIORS), len(behaviors))
    assert len(prefix) == min(_cut_position(session_id, *PURCHASE_CUT), first_funnel)


def test_purchase_intent_label_and_skip_examples() -> None:
    v, c, b = Behavior.VIEW, Behavior.CART, Behavior.BUY
    assert purchase_intent(make_session([b, v, v])) == "starts-with-cart-or-buy"
    assert purchase_intent(make_session([c, b])) == "starts-with-cart-or-buy"
    prefix, label = purchase_intent(make_session([v, c, b]))  # type: ignore[misc]
    assert label == 1
    assert [e.behavior for e in prefix] == [v]
    prefix, label = purchase_intent(make_session([v, v, c]))  # type: ignore[misc]
    assert label == 0
    assert all(e.behavior is v for e in prefix)
    _, label = purchase_intent(make_session([v]))  # type: ignore[misc]
    assert label == 0


def _mutate_future(
    session: list[Event], start: int, rng: random.Random, *, keep_funnel_at_start: bool
) -> list[Event]:
    """Same length; every event at index >= start gets a new behaviour and new fields."""
    mutated = session[:start]
    for i in range(start, len(session)):
        old = session[i].behavior
        if i == start and keep_funnel_at_start and old in FUNNEL_BEHAVIORS:
            new = rng.choice(FUNNEL_BEHAVIORS)
        else:
            new = rng.choice(list(Behavior))
        mutated.append(
            make_event(
                new,
                i,
                session_id=session[i].session_id,
                customer_id=session[i].customer_id,
                variant=rng.randint(1, 99),
            )
        )
    return mutated


@SETTINGS
@given(behaviors=behaviors_st, session_id=session_id_st, seed=st.integers(0, 2**16))
def test_purchase_intent_future_does_not_change_prefix(
    behaviors: list[Behavior], session_id: str, seed: int
) -> None:
    session = make_session(behaviors, session_id)
    built = purchase_intent(session)
    rng = random.Random(seed)
    if isinstance(built, str):
        return
    prefix, _ = built
    # the event right after the prefix may be the cart/buy that ended it: it stays a cart or buy
    mutated = _mutate_future(session, len(prefix), rng, keep_funnel_at_start=True)
    rebuilt = purchase_intent(mutated)
    assert not isinstance(rebuilt, str)
    assert rebuilt[0] == prefix
    assert rebuilt[1] == int(any(e.behavior is Behavior.BUY for e in mutated))


def test_purchase_intent_cart_to_buy_after_cut_changes_only_label() -> None:
    v = Behavior.VIEW
    for k in range(40):
        behaviors = [v] * 6 + [Behavior.CART] + [v] * 3
        session = make_session(behaviors, session_id=f"sess-{k}")
        prefix, label = purchase_intent(session)  # type: ignore[misc]
        assert label == 0
        swapped = list(session)
        swapped[6] = make_event(Behavior.BUY, 6, session_id=f"sess-{k}")
        prefix2, label2 = purchase_intent(swapped)  # type: ignore[misc]
        assert prefix2 == prefix
        assert label2 == 1


# --- next-behavior --------------------------------------------------------------------------------


@SETTINGS
@given(behaviors=behaviors_st, session_id=session_id_st)
def test_next_behavior_label_is_event_after_prefix(behaviors: list[Behavior], session_id: str) -> None:
    session = make_session(behaviors, session_id)
    built = next_behavior(session)
    cut = _cut_position(session_id, *NEXT_CUT)
    if cut >= len(session):
        assert built == "session-shorter-than-cut"
        return
    assert not isinstance(built, str)
    prefix, label = built
    assert len(prefix) == cut
    assert list(prefix) == session[: len(prefix)]
    nxt = session[len(prefix)].behavior
    assert label == list(Behavior).index(nxt)
    assert TASKS["next-behavior"].labels[label] == nxt.value


@SETTINGS
@given(behaviors=behaviors_st, session_id=session_id_st, seed=st.integers(0, 2**16))
def test_next_behavior_future_does_not_change_prefix(
    behaviors: list[Behavior], session_id: str, seed: int
) -> None:
    session = make_session(behaviors, session_id)
    built = next_behavior(session)
    if isinstance(built, str):
        return
    prefix, _ = built
    mutated = _mutate_future(session, len(prefix), random.Random(seed), keep_funnel_at_start=False)
    rebuilt = next_behavior(mutated)
    assert not isinstance(rebuilt, str)
    assert rebuilt[0] == prefix
    assert rebuilt[1] == list(Behavior).index(mutated[len(prefix)].behavior)


def test_next_behavior_cut_positions_vary_across_sessions() -> None:
    lengths = set()
    for k in range(60):
        prefix, _ = next_behavior(make_session([Behavior.VIEW] * 10, session_id=f"s{k}"))  # type: ignore[misc]
        lengths.add(len(prefix))
    assert len(lengths) >= 5
    assert lengths <= set(range(NEXT_CUT[0], NEXT_CUT[1] + 1))


@pytest.mark.parametrize("builder", [purchase_intent, next_behavior])
def test_appending_future_events_never_changes_the_example(builder) -> None:
    """The cut must not depend on the session's length: a longer future leaks nothing."""
    rng = random.Random(5)
    for k in range(200):
        behaviors = [
            rng.choice([Behavior.VIEW, Behavior.SEARCH, Behavior.FAV]) for _ in range(rng.randint(1, 12))
        ]
        session = make_session(behaviors, session_id=f"grow{k}")
        built = builder(session)
        if isinstance(built, str):
            continue
        prefix, _ = built
        longer = make_session([*behaviors, Behavior.CART, Behavior.BUY], session_id=f"grow{k}")
        rebuilt = builder(longer)
        assert not isinstance(rebuilt, str)
        assert rebuilt[0] == prefix


# --- build_candidates -----------------------------------------------------------------------------


def _merchant_events(seed: int, customers: int = 30) -> list[Event]:
    rng = random.Random(seed)
    events: list[Event] = []
    for c in range(customers):
        for s in range(rng.randint(1, 4)):
            behaviors = [rng.choice(list(Behavior)) for _ in range(rng.randint(1, 8))]
            events += make_session(behaviors, session_id=f"c{c}-s{s}", customer_id=f"c{c}")
    return events


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_build_candidates_counts_and_determinism(task_name: str) -> None:
    task = get_task(task_name)
    events = _merchant_events(1)
    candidates, stats = build_candidates(task, events)
    assert stats.sessions == len({(e.customer_id, e.session_id) for e in events})
    assert stats.candidates == sum(len(v) for v in candidates.values())
    assert stats.candidates + sum(stats.skipped.values()) == stats.sessions
    for customer, options in candidates.items():
        assert options
        assert all(c.customer_id == customer for c in options)
        assert all(
            e.customer_id == customer and e.session_id == c.session_id for c in options for e in c.prefix
        )
        assert all(0 <= c.label < task.num_labels for c in options)
    shuffled = events[:]
    random.Random(2).shuffle(shuffled)
    assert build_candidates(task, shuffled) == (candidates, stats)


def test_get_task_unknown() -> None:
    with pytest.raises(ValueError, match="no-such-task"):
        get_task("no-such-task")


# --- one_per_customer -----------------------------------------------------------------------------


def _candidates(customers: int = 50, per_customer: int = 5) -> dict[str, list[Candidate]]:
    out: dict[str, list[Candidate]] = {}
    for c in range(customers):
        cid = f"cust{c:03d}"
        out[cid] = [
            Candidate(cid, f"{cid}-s{s}", tuple(make_session([Behavior.VIEW], f"{cid}-s{s}", cid)), s % 2)
            for s in range(per_customer)
        ]
    return out


def test_one_per_customer_at_most_one_and_only_requested() -> None:
    cands = _candidates()
    requested = [f"cust{c:03d}" for c in range(0, 50, 3)] + ["unknown-customer"]
    chosen = one_per_customer(cands, requested, round_seed=1)
    customers = [c.customer_id for c in chosen]
    assert len(customers) == len(set(customers))
    assert set(customers) == set(requested) - {"unknown-customer"}
    for c in chosen:
        assert c in cands[c.customer_id]


def test_one_per_customer_skips_customers_without_candidates() -> None:
    cands = _candidates(3)
    cands["cust001"] = []
    chosen = one_per_customer(cands, ["cust000", "cust001", "cust002"], round_seed=0)
    assert [c.customer_id for c in chosen] == ["cust000", "cust002"]
    assert one_per_customer(cands, [], round_seed=0) == []


def test_one_per_customer_deterministic_per_round_and_varies_across_rounds() -> None:
    cands = _candidates()
    customers = list(cands)
    first = one_per_customer(cands, customers, round_seed=3)
    assert one_per_customer(cands, list(reversed(customers)), round_seed=3) == first
    assert one_per_customer(cands, customers, round_seed="3") == first  # the seed is hashed via str()
    second = one_per_customer(cands, customers, round_seed=4)
    changed = sum(a.session_id != b.session_id for a, b in zip(first, second, strict=True))
    assert changed >= 10  # with 5 options each, ~80% of customers should change
    # over many rounds every option of a customer gets picked at some point
    picks = Counter(one_per_customer(cands, ["cust007"], round_seed=r)[0].session_id for r in range(100))
    assert len(picks) == 5


def test_one_per_customer_duplicate_customer_ids() -> None:
    cands = _candidates(2)
    chosen = one_per_customer(cands, ["cust000", "cust000", "cust001"], round_seed=0)
    assert len(chosen) == 2


# --- split_customers ------------------------------------------------------------------------------


def test_split_customers_disjoint_covering_and_fraction() -> None:
    customers = [f"customer-{i}" for i in range(1000)]
    train, held_out = split_customers(customers, eval_fraction=0.2, salt="m1")
    assert set(train).isdisjoint(held_out)
    assert set(train) | set(held_out) == set(customers)
    assert len(train) + len(held_out) == 1000
    assert 150 <= len(held_out) <= 250  # binomial(1000, 0.2): sd ≈ 12.6
    _, held30 = split_customers(customers, eval_fraction=0.3, salt="m1")
    assert 250 <= len(held30) <= 350
    # a larger fraction only adds held-out customers (same hash, larger threshold)
    assert set(held_out) <= set(held30)


def test_split_customers_stable_under_input_order_and_salted() -> None:
    customers = [f"customer-{i}" for i in range(300)]
    a = split_customers(customers, eval_fraction=0.25, salt="x")
    shuffled = customers[:]
    random.Random(5).shuffle(shuffled)
    assert split_customers(shuffled, eval_fraction=0.25, salt="x") == a
    assert split_customers(iter(shuffled), eval_fraction=0.25, salt="x") == a
    assert split_customers(customers, eval_fraction=0.25, salt="y") != a


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_customers_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError):
        split_customers(["a", "b"], eval_fraction=fraction, salt="s")


# --- split_by_time --------------------------------------------------------------------------------

DAY = timedelta(days=1)
CUTOFF = T0 + 3 * DAY  # public: in the run config, not learnt from any session


def _timed(customer: str, session_id: str, start: datetime, minutes: float = 10) -> Candidate:
    """A candidate whose session starts at `start` and ends `minutes` later."""
    first = make_event(Behavior.VIEW, 0, session_id=session_id, customer_id=customer)
    prefix = (first.model_copy(update={"timestamp": start}),)
    return Candidate(customer, session_id, prefix, 0, start + timedelta(minutes=minutes))


def _daily(customers: Iterable[int], days: int = 6) -> dict[str, list[Candidate]]:
    """Customer i: one session a day ("s0" … ), at minute 7·i of the day."""
    return {
        f"cust{i:03d}": [
            _timed(f"cust{i:03d}", f"s{d}", T0 + d * DAY + timedelta(minutes=7 * i)) for d in range(days)
        ]
        for i in customers
    }


def _sessions(candidates: list[Candidate]) -> list[str]:
    return [c.session_id for c in candidates]


def test_split_by_time_holds_out_customers_and_only_their_later_sessions() -> None:
    cands = _daily(range(60))
    # starts before the cut-off and ends after it: neither training nor evaluation may use it
    cands["cust000"].append(_timed("cust000", "straddle", CUTOFF - timedelta(minutes=5)))
    train, held_out = split_by_time(cands, cutoff=CUTOFF, eval_fraction=0.25, salt="m")
    train_ids, eval_ids = split_customers(cands, eval_fraction=0.25, salt="m")
    assert sorted(train) == train_ids and sorted(held_out) == eval_ids  # the customer hash decides
    assert set(train).isdisjoint(held_out) and 8 <= len(held_out) <= 22
    assert all(_sessions(cs) == ["s0", "s1", "s2"] for cs in train.values())
    assert all(_sessions(cs) == ["s3", "s4", "s5"] for cs in held_out.values())
    assert all("straddle" not in _sessions(cs) for cs in [*train.values(), *held_out.values()])


def test_split_by_time_boundary_instants() -> None:
    cands = _daily(range(20))
    train_ids, eval_ids = split_customers(cands, eval_fraction=0.25, salt="m")
    t, e = train_ids[0], eval_ids[0]
    cands[t] += [
        _timed(t, "ends-at-cutoff", CUTOFF - timedelta(minutes=10)),
        _timed(t, "ends-just-before", CUTOFF - timedelta(minutes=10, seconds=1)),
    ]
    cands[e] += [
        _timed(e, "starts-at-cutoff", CUTOFF),
        _timed(e, "starts-just-before", CUTOFF - timedelta(seconds=1)),
    ]
    train, held_out = split_by_time(cands, cutoff=CUTOFF, eval_fraction=0.25, salt="m")
    assert _sessions(train[t]) == ["s0", "s1", "s2", "ends-just-before"]
    assert _sessions(held_out[e]) == ["s3", "s4", "s5", "starts-at-cutoff"]


def test_split_by_time_adding_a_customer_changes_no_one_elses_examples() -> None:
    cands = _daily(range(40))
    before = split_by_time(cands, cutoff=CUTOFF, eval_fraction=0.25, salt="m")
    # many late sessions of one newcomer would have moved a quantile of session start times
    late = [_timed("cust999", f"late{d}", T0 + (10 + d) * DAY) for d in range(200)]
    after = split_by_time({**cands, "cust999": late}, cutoff=CUTOFF, eval_fraction=0.25, salt="m")
    for side_before, side_after in zip(before, after, strict=True):
        assert {k: v for k, v in side_after.items() if k != "cust999"} == side_before


@SETTINGS
@given(
    offsets=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 600), st.integers(0, 9)), max_size=60),
    cut_hours=st.integers(0, 31 * 24),
)
def test_split_by_time_never_shares_a_customer_nor_leaks_the_future(
    offsets: list[tuple[int, int, int]], cut_hours: int
) -> None:
    cands: dict[str, list[Candidate]] = {}
    for n, (day, minutes, customer) in enumerate(offsets):
        cid = f"cust{customer}"
        cands.setdefault(cid, []).append(_timed(cid, f"s{n}", T0 + day * DAY, minutes=minutes))
    cutoff = T0 + timedelta(hours=cut_hours)
    train, held_out = split_by_time(cands, cutoff=cutoff, eval_fraction=0.3, salt="x")
    assert set(train).isdisjoint(held_out)
    assert all(c.ends_at is not None and c.ends_at < cutoff for cs in train.values() for c in cs)
    assert all(c.prefix[0].timestamp >= cutoff for cs in held_out.values() for c in cs)
    assert all(c in cands[k] for side in (train, held_out) for k, cs in side.items() for c in cs)


def test_split_by_time_refuses_a_cutoff_without_time_zone() -> None:
    with pytest.raises(ValueError, match="time zone"):
        split_by_time(_daily(range(3)), cutoff=CUTOFF.replace(tzinfo=None), eval_fraction=0.25, salt="m")


# --- stable_hash ----------------------------------------------------------------------------------


def test_stable_hash_is_process_independent() -> None:
    # values computed once; Python's salted hash() would differ from process to process
    assert stable_hash("cut", "s1") == 4332054801526860530
    assert stable_hash("split", "salt", "c1") == 13455809538450402771
    assert stable_hash("x", 1, 2.5) == 7668698732927141506


def test_stable_hash_range_and_sensitivity() -> None:
    values = {stable_hash("k", i) for i in range(1000)}
    assert len(values) == 1000
    assert all(0 <= v < 2**64 for v in values)
    assert stable_hash("a", "b") != stable_hash("b", "a")
