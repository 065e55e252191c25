"""Behaviour events and the examples built from them (pydantic models, validated at the boundary)."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

# Plausible event times: anything outside is a corrupt or mis-scaled value (e.g. milliseconds read as
# seconds lands in the year 49000), not an e-commerce event. Fixed, not "now", so validation is
# reproducible.
MIN_TIMESTAMP = datetime(1995, 1, 1, tzinfo=timezone.utc)
MAX_TIMESTAMP = datetime(2100, 1, 1, tzinfo=timezone.utc)


class RowReason(str, enum.Enum):
    """Why a row of the merchant's data was quarantined: one list for every reader (`merchant ingest`,
    `validate-data`, training, `predict`), in order of precedence: a row gets the first that applies.
    The ingest checks a whole column at a time (`client.ingest.validate`), the other readers one
    `Event` at a time (`row_reason`); a test feeds both the same rows."""

    UNPARSEABLE = "unparseable"
    EMPTY_ROW = "empty_row"
    BAD_ENCODING = "bad_encoding"
    MISSING_CUSTOMER_ID = "missing_customer_id"
    MISSING_SESSION_ID = "missing_session_id"
    BAD_TIMESTAMP = "bad_timestamp"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    UNKNOWN_BEHAVIOR = "unknown_behavior"  # empty, or (strict mode, fixed formats) not in the role map
    BAD_PRICE = "bad_price"
    NEGATIVE_PRICE = "negative_price"
    BAD_RATING = "bad_rating"  # not a whole number from 1 to 5
    EMPTY_REVIEW = "empty_review"  # a review event with neither rating nor text
    BAD_VALUE = "bad_value"  # any other field of the wrong type, or a field the schema does not know
    DUPLICATE = "duplicate"

    @property
    def code(self) -> int:
        """1-based precedence (0 means "good" in the validation arrays)."""
        return list(RowReason).index(self) + 1


class Behavior(str, enum.Enum):
    """The funnel role of an event. `view` is a page view (Taobao calls it `pv`); `other` is any event
    the shop logs that has no funnel role (a promo page, a filter, a shipping form not mapped to cart):
    it is kept, and its own name (`Event.event_name`) goes into the text."""

    VIEW = "view"
    FAV = "fav"
    CART = "cart"
    BUY = "buy"
    SEARCH = "search"
    REVIEW = "review"
    OTHER = "other"

    @classmethod
    def parse(cls, value: str) -> Behavior:
        """Parse a behaviour name, accepting the common aliases (`pv`, `addtocart`, ...)."""
        key = value.strip().lower()
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(b.value for b in cls)
            raise ValueError(
                f"unknown behaviour {value!r}; expected one of {known} (or pv/addtocart/purchase)"
            ) from None


_ALIASES = {
    "pv": "view",
    "click": "view",
    "addtocart": "cart",
    "add_to_cart": "cart",
    "transaction": "buy",
    "purchase": "buy",
    "favorite": "fav",
    "favourite": "fav",
}

FUNNEL_BEHAVIORS = (Behavior.CART, Behavior.BUY)
"""Default roles that reveal purchase intent directly; a purchase-intent prefix must contain none
(the run config's `leak-roles` can name more, e.g. `fav`)."""


class Event(BaseModel):
    """One behaviour event of one customer at one merchant."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    customer_id: str = Field(min_length=1)
    session_id: str = Field(min_length=1)
    timestamp: datetime
    behavior: Behavior
    # the shop's own name of the event ("promo_page", "shipping_details"); None: the role's name
    event_name: str | None = None
    item_id: str | None = None
    title: str | None = None
    category: str | None = None
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    query: str | None = None
    review_text: str | None = None
    rating: int | None = Field(default=None, ge=1, le=5)
    # optional customer attributes (as the merchant knows them at the time of the event)
    customer_segment: str | None = None
    customer_region: str | None = None
    customer_age_band: str | None = None
    # attribute columns kept at ingest (`--attribute platform,user_lifecycle`): "platform=mobile | …"
    attributes: str | None = None

    def customer_attributes(self) -> tuple[str, ...]:
        """Attribute values for the text ("gold", "north", "mobile"): the names cost tokens and say
        little the values do not."""
        known = [self.customer_segment, self.customer_region, self.customer_age_band]
        known += [pair.partition("=")[2] or pair for pair in (self.attributes or "").split(" | ")]
        return tuple(a.strip() for a in known if a and a.strip())

    @field_validator("behavior", mode="before")
    @classmethod
    def _parse_behavior(cls, value: object) -> object:
        return Behavior.parse(value) if isinstance(value, str) else value

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # Naive timestamps are taken as UTC so that sorting and gaps never mix conventions.
        value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if not MIN_TIMESTAMP <= value < MAX_TIMESTAMP:
            raise PydanticCustomError(
                RowReason.TIMESTAMP_OUT_OF_RANGE.value,
                "is outside {low}..{high}",
                {"low": f"{MIN_TIMESTAMP:%Y-%m-%d}", "high": f"{MAX_TIMESTAMP:%Y-%m-%d}"},
            )
        return value

    @model_validator(mode="after")
    def _fields_for_behavior(self) -> Event:
        # item_id and query are optional: many shops log page types without items, and a search
        # without its query text is still an event (its name goes into the text). Only a review
        # that says nothing is not an event.
        if self.behavior is Behavior.REVIEW and self.rating is None and not self.review_text:
            raise PydanticCustomError(
                RowReason.EMPTY_REVIEW.value, "a review event needs `rating` or `review_text`"
            )
        return self

    @property
    def name(self) -> str:
        """How the event reads in text: the shop's own name, made readable, else the role's name."""
        if not self.event_name:
            return self.behavior.value
        return " ".join(self.event_name.replace("_", " ").replace("-", " ").split())


_FIELD_REASONS = {
    "customer_id": RowReason.MISSING_CUSTOMER_ID,
    "session_id": RowReason.MISSING_SESSION_ID,
    "timestamp": RowReason.BAD_TIMESTAMP,
    "behavior": RowReason.UNKNOWN_BEHAVIOR,
    "price": RowReason.BAD_PRICE,
    "rating": RowReason.BAD_RATING,
}


def _reason_of(error: dict[str, object]) -> RowReason:
    kind = str(error.get("type", ""))
    if kind in {r.value for r in RowReason}:  # raised by Event's own validators
        return RowReason(kind)
    loc = error.get("loc") or ()
    field = str(loc[0]) if isinstance(loc, tuple) and loc else ""
    if field == "price" and kind == "greater_than_equal":
        return RowReason.NEGATIVE_PRICE
    return _FIELD_REASONS.get(field, RowReason.BAD_VALUE)


def row_reason(err: ValidationError) -> tuple[RowReason, str]:
    """The quarantine reason of a row `Event` refused, and a one-line detail naming the field and the
    value: the reason of highest precedence among its errors, as the ingest would pick it."""
    found = [(_reason_of(dict(e)), e) for e in err.errors()]
    reason, first = min(found, key=lambda pair: pair[0].code)
    loc = ".".join(str(p) for p in first.get("loc", ())) or "row"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or value is None else f"={value!r}"
    return reason, f"{loc}{shown} {first.get('msg', 'is invalid')}"


class Example(BaseModel):
    """One training or evaluation example: text, label and the customer it belongs to."""

    model_config = ConfigDict(frozen=True)

    customer_id: str
    session_id: str
    text: str
    label: int = Field(ge=0)
