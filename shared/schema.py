"""Behaviour events and the examples built from them (pydantic models, validated at the boundary)."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Behavior(str, enum.Enum):
    """What a customer did. `view` is a page view (Taobao calls it `pv`)."""

    VIEW = "view"
    FAV = "fav"
    CART = "cart"
    BUY = "buy"
    SEARCH = "search"
    REVIEW = "review"

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
"""Behaviours that reveal purchase intent directly; a purchase-intent prefix must contain none."""


class Event(BaseModel):
    """One behaviour event of one customer at one merchant."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    customer_id: str = Field(min_length=1)
    session_id: str = Field(min_length=1)
    timestamp: datetime
    behavior: Behavior
    item_id: str | None = None
    title: str | None = None
    category: str | None = None
    price: float | None = Field(default=None, ge=0)
    query: str | None = None
    review_text: str | None = None
    rating: int | None = Field(default=None, ge=1, le=5)
    # optional customer attributes (as the merchant knows them at the time of the event)
    customer_segment: str | None = None
    customer_region: str | None = None
    customer_age_band: str | None = None

    def customer_attributes(self) -> tuple[str, ...]:
        return tuple(a for a in (self.customer_segment, self.customer_region, self.customer_age_band) if a)

    @field_validator("behavior", mode="before")
    @classmethod
    def _parse_behavior(cls, value: object) -> object:
        return Behavior.parse(value) if isinstance(value, str) else value

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # Naive timestamps are taken as UTC so that sorting and gaps never mix conventions.
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)

    @model_validator(mode="after")
    def _fields_for_behavior(self) -> Event:
        if self.behavior is Behavior.SEARCH and not self.query:
            raise ValueError("a search event needs a non-empty `query`")
        if self.behavior is not Behavior.SEARCH and not self.item_id:
            raise ValueError(f"a {self.behavior.value} event needs an `item_id`")
        if self.behavior is Behavior.REVIEW and self.rating is None and not self.review_text:
            raise ValueError("a review event needs `rating` or `review_text`")
        return self


class Example(BaseModel):
    """One training or evaluation example: text, label and the customer it belongs to."""

    model_config = ConfigDict(frozen=True)

    customer_id: str
    session_id: str
    text: str
    label: int = Field(ge=0)
