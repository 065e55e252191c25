"""Tests of shared/text.py: events → text."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.schema import Behavior, Event
from shared.text import SEPARATOR, event_phrase, format_price, serialize, whitespace_counter

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)


def ev(i: int, behavior: str = "view", **fields: object) -> Event:
    values: dict[str, object] = {
        "customer_id": "c1",
        "session_id": "s1",
        "timestamp": T0 + timedelta(minutes=i),
        "behavior": behavior,
    }
    if behavior == "search":
        values.setdefault("query", f"query{i}")
    else:
        values["item_id"] = f"item{i}"
    values.update(fields)
    return Event.model_validate(values)


def count(text: str) -> int:
    return whitespace_counter([text])[0]


# --- format_price ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "expected"),
    [(5999, "5999"), (5999.0, "5999"), (0.0, "0"), (19.9, "19.90"), (0.5, "0.50"), (1.234, "1.23")],
)
def test_format_price(price: float, expected: str) -> None:
    assert format_price(price) == expected


# --- event_phrase ---------------------------------------------------------------------------------


def test_phrase_view_with_all_fields() -> None:
    e = ev(0, "view", title="iPhone 12 手机", category="phones", price=5999.0)
    assert event_phrase(e) == "view iPhone 12 手机 phones 5999"


def test_phrase_search_uses_query() -> None:
    assert event_phrase(ev(0, "search", query="running shoes")) == "search running shoes"


def test_phrase_review_includes_rating_and_text() -> None:
    e = ev(0, "review", title="Kettle", rating=4, review_text="boils fast")
    phrase = event_phrase(e)
    assert phrase == "review 4 stars Kettle boils fast"
    assert "4 stars" in event_phrase(ev(0, "review", rating=4))


def test_phrase_review_without_rating_has_no_stars() -> None:
    phrase = event_phrase(ev(0, "review", review_text="meh"))
    assert "stars" not in phrase
    assert phrase == "review meh"


@pytest.mark.parametrize("behavior", [b.value for b in Behavior if b is not Behavior.REVIEW])
def test_phrase_minimal_event_has_no_none(behavior: str) -> None:
    phrase = event_phrase(ev(0, behavior))
    assert "None" not in phrase
    assert phrase.split()[0] == behavior


def test_phrase_blank_optional_fields_are_left_out() -> None:
    phrase = event_phrase(ev(0, "cart", title="  ", category="", price=None))
    assert phrase == "cart"


def test_phrase_zero_price_is_kept() -> None:
    assert event_phrase(ev(0, "buy", title="gift", price=0.0)) == "buy gift 0"


# --- serialize ------------------------------------------------------------------------------------


def test_serialize_oldest_first_joined_by_separator() -> None:
    events = [ev(0, "view", title="a"), ev(1, "fav", title="b"), ev(2, "cart", title="c")]
    assert serialize(events, max_tokens=100) == "view a ; fav b ; cart c"


def test_serialize_is_independent_of_input_order() -> None:
    events = [
        ev(i, b, title=f"t{i}", price=float(i), **({"rating": 5} if b == "review" else {}))
        for i, b in enumerate(["view", "search", "fav", "view", "cart", "review", "buy", "view"])
    ]
    # ties on timestamp with different behaviours must also be ordered deterministically
    events += [ev(3, "fav", item_id="item3"), ev(3, "cart", item_id="item3")]
    expected = serialize(events, max_tokens=30)
    rng = random.Random(0)
    for _ in range(20):
        shuffled = events[:]
        rng.shuffle(shuffled)
        assert serialize(shuffled, max_tokens=30) == expected
        assert serialize(tuple(reversed(shuffled)), max_tokens=30) == expected


def test_serialize_order_independent_for_full_key_ties() -> None:
    a = ev(0, "view", item_id="x", title="red")
    b = ev(0, "view", item_id="x", title="blue")
    assert serialize([a, b], max_tokens=100) == serialize([b, a], max_tokens=100)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(min_value=1, max_value=25),
    max_tokens=st.integers(min_value=1, max_value=40),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_serialize_keeps_most_recent_events_within_budget(n: int, max_tokens: int, seed: int) -> None:
    rng = random.Random(seed)
    words = ["a", "bb", "手机", "iPhone 12", "red shoes size 42", "x y z w"]
    events = [ev(i, "view", title=rng.choice(words)) for i in range(n)]
    phrases = [event_phrase(e) for e in events]  # events already in time order
    rng.shuffle(events)
    text = serialize(events, max_tokens=max_tokens)
    kept = text.split(SEPARATOR)
    k = len(kept)
    # the kept phrases are exactly the k most recent, oldest first
    assert kept == phrases[n - k :]
    # the most recent event is always present
    assert kept[-1] == phrases[-1]
    # token count (separators included) within the budget, unless only the last event is kept
    if k > 1:
        assert count(text) <= max_tokens
    # greedy: one more (older) event would not have fit
    if k < n:
        longer = SEPARATOR.join(phrases[n - k - 1 :])
        assert count(longer) > max_tokens


def test_serialize_budget_exact_values() -> None:
    events = [ev(i, "view") for i in range(5)]  # each phrase "view" = 1 token, separator ";" = 1 token
    assert serialize(events, max_tokens=1) == "view"
    assert serialize(events, max_tokens=2) == "view"
    assert serialize(events, max_tokens=3) == "view ; view"
    assert serialize(events, max_tokens=5) == "view ; view ; view"
    assert serialize(events, max_tokens=9) == " ; ".join(["view"] * 5)


def test_serialize_most_recent_event_kept_even_if_too_long() -> None:
    events = [ev(0, "view", title="short"), ev(1, "buy", title="a very long title with many words indeed")]
    text = serialize(events, max_tokens=2)
    assert text == "buy a very long title with many words indeed"


def test_serialize_uses_given_counter() -> None:
    events = [ev(i, "view", title="手机") for i in range(4)]

    def char_counter(texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    # phrase "view 手机" = 7 chars, separator ";" = 1 char
    assert serialize(events, max_tokens=15, count_tokens=char_counter) == "view 手机 ; view 手机"
    assert serialize(events, max_tokens=14, count_tokens=char_counter) == "view 手机"


def test_serialize_chinese_titles_survive() -> None:
    events = [
        ev(0, "search", query="苹果 手机"),
        ev(1, "view", title="iPhone 12 手机", category="手机", price=5999),
        ev(2, "fav", title="华为 Mate 40", price=4999.5),
    ]
    text = serialize(events, max_tokens=100)
    assert text == "search 苹果 手机 ; view iPhone 12 手机 手机 5999 ; fav 华为 Mate 40 4999.50"


def test_serialize_no_none_when_fields_missing() -> None:
    events = [ev(0, b) for b in ("view", "fav", "cart", "buy")] + [
        ev(4, "search"),
        ev(5, "review", rating=3),
        ev(6, "review", review_text="ok"),
    ]
    text = serialize(events, max_tokens=100)
    assert "None" not in text
    assert "3 stars" in text
    assert text.count(SEPARATOR) == len(events) - 1


def test_serialize_empty_and_invalid_budget() -> None:
    assert serialize([], max_tokens=10) == ""
    with pytest.raises(ValueError):
        serialize([ev(0)], max_tokens=0)


def test_customer_attributes_prefix_when_they_fit() -> None:
    from datetime import datetime, timezone

    from shared.schema import Event

    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    e = Event(
        customer_id="c",
        session_id="s",
        timestamp=t,
        behavior="view",
        item_id="i",
        title="lamp",
        customer_segment="gold",
        customer_region="north",
    )
    assert serialize([e], max_tokens=50) == "gold north ; view lamp"
    assert serialize([e], max_tokens=2) == "view lamp"  # events come first when the budget is short
