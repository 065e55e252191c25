"""Events of a ScoreRequest, checked as the ingest checks a shop's export (generic, open vocabulary).

What the ingest would quarantine is refused here with the field's path and the fix
(`events[3].timestamp: 'x' is not RFC 3339 ...`): empty customer or session ids, a time that does
not parse or lies outside the ingest's plausible span, a negative price, an empty behaviour. As in
`fedbehavior predict` on a CSV, the behaviour string is looked up in the standard names and aliases
plus the merchant's `--behavior-map`; an unknown name is the role `other` and its own name is kept as
`event_name` (with `strict`: refused); exact duplicates (same customer, time to the millisecond and
fields) are dropped, as the ingest drops them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from client.ingest.formats import behavior_table
from client.ingest.schema import MAX_TIMESTAMP, MIN_TIMESTAMP
from shared.schema import Behavior, Event

MAX_EVENTS = 10_000
"""Events one request may carry by default (a session is tens; this bounds one request's memory):
`fedbehavior serve --max-events`."""
MAX_SESSIONS = 256
"""Sessions (distinct customer and session ids) one request may carry by default: `--max-sessions`."""
_OPTIONAL_TEXT = ("event_name", "item_id", "title", "category", "query")


class RequestError(ValueError):
    """A request the server refuses: `field` is the path of the offending field (events[3].timestamp)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class LimitError(RequestError):
    """A request past one of the server's limits (RESOURCE_EXHAUSTED): the message names the flag."""


class EventReader:
    """Turns request events into `Event`s with the roles the merchant's ingest would give them."""

    def __init__(
        self,
        behavior_map: Mapping[str, str] | None = None,
        *,
        strict: bool = False,
        max_events: int = MAX_EVENTS,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        table = behavior_table(behavior_map, strict=strict)  # raises IngestError on a bad map
        self.roles: dict[str, str] = dict(zip(table.keys.to_pylist(), table.values.to_pylist(), strict=True))
        self.strict, self.max_events, self.max_sessions = strict, max_events, max_sessions

    def role(self, name: str, field: str) -> Behavior:
        """The funnel role of a behaviour or event name (exact, then trimmed lower case)."""
        found = self.roles.get(name) or self.roles.get(name.strip().lower())
        if found is not None:
            return Behavior(found)
        if self.strict:
            known = ", ".join(sorted(self.roles))
            raise RequestError(
                field, f"{name!r} is not a known behaviour ({known}); map it with --behavior-map"
            )
        return Behavior.OTHER

    def event(self, raw: Any, i: int) -> Event:
        """One request event (a protobuf `Event`) as a validated `Event`."""
        where = f"events[{i}]"
        for required in ("customer_id", "session_id"):
            if not getattr(raw, required):
                raise RequestError(f"{where}.{required}", "is empty; every event needs one")
        behavior_text, event_name = raw.behavior, raw.event_name
        if behavior_text:
            behavior = self.role(behavior_text, f"{where}.behavior")
            event_name = event_name or behavior_text  # the ingest keeps the shop's name as event_name
        elif event_name:
            behavior = self.role(event_name, f"{where}.event_name")
        else:
            raise RequestError(f"{where}.behavior", "is empty; set behavior (a funnel role) or event_name")
        fields: dict[str, Any] = {
            "customer_id": raw.customer_id,
            "session_id": raw.session_id,
            "timestamp": parse_time(raw.timestamp, f"{where}.timestamp"),
            "behavior": behavior,
        }
        fields.update({name: getattr(raw, name) or None for name in _OPTIONAL_TEXT})
        fields["event_name"] = event_name or None
        if raw.HasField("price"):
            if not math.isfinite(raw.price) or raw.price < 0:
                raise RequestError(f"{where}.price", f"{raw.price!r} is not a non-negative number")
            fields["price"] = raw.price
        try:
            return Event.model_validate(fields)
        except ValidationError as err:
            first = err.errors()[0]
            name = ".".join(str(x) for x in first["loc"]) or "behavior"  # model checks: the role's rules
            problem = first["msg"].removeprefix("Value error, ")
            if behavior is Behavior.REVIEW:  # this API carries no rating or review text
                problem += " (not in this API: score reviews as behavior other, or leave them out)"
            raise RequestError(f"{where}.{name}", problem) from None

    def events(self, raw_events: Sequence[Any]) -> list[Event]:
        """All events of a request, exact duplicates dropped; raises RequestError on the first bad one."""
        if not raw_events:
            raise RequestError("events", "is empty; send at least one event")
        if len(raw_events) > self.max_events:
            raise LimitError(
                "events",
                f"{len(raw_events)} events, more than the {self.max_events} one request may carry "
                "(the server's --max-events); split the request",
            )
        sessions = len({(raw.customer_id, raw.session_id) for raw in raw_events})  # before parsing
        if sessions > self.max_sessions:
            raise LimitError(
                "events",
                f"{sessions} sessions, more than the {self.max_sessions} one request may carry "
                "(the server's --max-sessions); split the request",
            )
        seen: set[tuple[Any, ...]] = set()
        events: list[Event] = []
        for i, raw in enumerate(raw_events):
            event = self.event(raw, i)
            key = tuple(getattr(event, f) for f in Event.model_fields)
            if key not in seen:
                seen.add(key)
                events.append(event)
        return events


def parse_time(text: str, field: str) -> datetime:
    """An RFC 3339 date-time with an offset, truncated to the millisecond like the ingest's store."""
    example = "use RFC 3339 with an offset, e.g. 2026-01-01T10:00:00Z"
    try:
        # RFC 3339 allows a lower-case t/z and a space for T; fromisoformat takes them from Python 3.11
        value = datetime.fromisoformat(text.strip().replace("z", "Z").replace("t", "T"))
    except ValueError:
        raise RequestError(field, f"{text!r} is not RFC 3339; {example}") from None
    if ("T" not in text.upper() and " " not in text.strip()) or value.tzinfo is None:
        raise RequestError(field, f"{text!r} has no time or no offset; {example}")
    if not MIN_TIMESTAMP <= value < MAX_TIMESTAMP:
        raise RequestError(field, f"{text!r} is outside {MIN_TIMESTAMP:%Y-%m-%d}..{MAX_TIMESTAMP:%Y-%m-%d}")
    value = value.astimezone(timezone.utc)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)
