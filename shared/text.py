"""Behaviour events → text in the backbone's vocabulary.

One event becomes a short phrase ("view iPhone 12 手机 phones 5999"; with the shop's own event name,
"promo page" or "shipping details"); a sequence becomes the phrases of its most recent events, oldest
first, joined by " ; ", keeping as many recent events as fit in the token budget, preceded by the
customer's attributes (segment, region, age band, ingested attribute columns) when known and when
they fit. The output depends only on the events, never on their input order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from shared.schema import Behavior, Event

SEPARATOR = " ; "


class TokenCounter(Protocol):
    """Counts tokens of several strings at once (without special tokens)."""

    def __call__(self, texts: list[str]) -> list[int]: ...


def format_price(price: float) -> str:
    """Whole prices without decimals ("5999"), others with two ("19.90")."""
    return str(int(price)) if float(price).is_integer() else f"{price:.2f}"


def event_phrase(event: Event) -> str:
    """The phrase for one event; empty fields are left out, never rendered as 'None'."""
    if event.behavior is Behavior.SEARCH:
        return f"{event.name} {event.query or ''}".strip()
    parts: list[str] = [event.name]
    if event.behavior is Behavior.REVIEW and event.rating is not None:
        parts.append(f"{event.rating} stars")
    for field in (event.title, event.category):
        if field:
            parts.append(field)
    if event.price is not None:
        parts.append(format_price(event.price))
    if event.behavior is Behavior.REVIEW and event.review_text:
        parts.append(event.review_text)
    return " ".join(p.strip() for p in parts if p.strip())


def whitespace_counter(texts: list[str]) -> list[int]:
    """A crude counter (one token per whitespace-separated word) for code paths without a tokenizer."""
    return [len(t.split()) for t in texts]


def tokenizer_counter(tokenizer: object) -> TokenCounter:
    """Wrap a Hugging Face tokenizer as a `TokenCounter`."""

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = tokenizer(texts, add_special_tokens=False)  # type: ignore[operator]
        return [len(ids) for ids in encoded["input_ids"]]

    return count


def serialize(
    events: Sequence[Event],
    *,
    max_tokens: int,
    count_tokens: TokenCounter | Callable[[list[str]], list[int]] = whitespace_counter,
) -> str:
    """Text of the most recent events that fit in `max_tokens` (separators included), oldest first.

    The most recent event is always kept, truncated by the tokenizer later if it alone is too long.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    # ties in time are broken by the full content, so the input order never matters
    ordered = sorted(events, key=lambda e: (e.timestamp, e.model_dump_json()))
    phrases = [event_phrase(e) for e in ordered]
    counts = count_tokens(phrases)
    sep_cost = count_tokens([SEPARATOR.strip()])[0] if phrases else 0
    kept: list[str] = []
    used = 0
    for phrase, n in zip(reversed(phrases), reversed(counts), strict=True):
        cost = n + (sep_cost if kept else 0)
        if kept and used + cost > max_tokens:
            break
        kept.append(phrase)
        used += cost
    text = SEPARATOR.join(reversed(kept))
    # customer attributes of the most recent event that has any, as a short prefix ("gold north ; …")
    attributes = next((e.customer_attributes() for e in reversed(ordered) if e.customer_attributes()), ())
    if attributes:
        head = " ".join(attributes)
        if count_tokens([head])[0] + sep_cost + used <= max_tokens:
            text = head + SEPARATOR + text
    return text
