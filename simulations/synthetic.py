"""Synthetic merchants, deterministic from a seed: non-IID shops with realistic funnels.

Each merchant has its own category mix, price level, conversion rate, size and share of Chinese
titles. Each session has a hidden intent: a *shopper* focuses on one category, revisits items,
searches with purchase words and often moves on to cart and buy; a *browser* hops between categories
with vague queries and rarely buys. The cues overlap (browsers sometimes use purchase words and
revisit items, shoppers sometimes do not), so no single count decides the label; a text model has to
combine them. The merchant's data goes to its own folder, read back by its client like real data.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from shared.fileio import atomic_write_bytes, atomic_write_json
from simulations.catalog import BROWSE_QUERY_WORDS, CATEGORIES, INTENT_QUERY_WORDS, REVIEW_TEXTS

EVENTS_FILE = "events.jsonl"
SETTINGS_FILE = "merchant.json"
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class MerchantProfile:
    merchant_id: str
    category_weights: dict[str, float]
    price_level: float
    shopper_rate: float
    customers: int
    chinese_share: float


def merchant_profile(seed: int, index: int, base_customers: int) -> MerchantProfile:
    """The non-IID profile of merchant `index` (category mix, prices, conversion, size, language)."""
    rng = random.Random(f"profile:{seed}:{index}")
    names = list(CATEGORIES)
    raw = [rng.gammavariate(0.6, 1.0) for _ in names]
    total = sum(raw)
    return MerchantProfile(
        merchant_id=f"merchant-{index}",
        category_weights={n: w / total for n, w in zip(names, raw, strict=True)},
        price_level=rng.uniform(0.7, 1.5),
        shopper_rate=rng.uniform(0.25, 0.5),
        customers=max(20, int(base_customers * rng.uniform(0.8, 1.25))),
        chinese_share=rng.uniform(0.1, 0.7),
    )


class _SessionWriter:
    def __init__(self, profile: MerchantProfile, rng: random.Random) -> None:
        self.p, self.rng = profile, rng
        self.sessions = 0

    def _category(self) -> str:
        names = list(self.p.category_weights)
        return self.rng.choices(names, weights=[self.p.category_weights[n] for n in names])[0]

    def _item(self, category: str) -> dict[str, object]:
        en, zh, products = CATEGORIES[category]
        k = self.rng.randrange(len(products))
        name, base = products[k]
        noun = zh if self.rng.random() < self.p.chinese_share else en
        price = round(base * self.p.price_level * self.rng.uniform(0.9, 1.1), 0)
        return {"item_id": f"{category}-{k}", "title": f"{name} {noun}", "category": category, "price": price}

    def _query(self, category: str, intent: bool) -> str:
        en, zh, products = CATEGORIES[category]
        words = INTENT_QUERY_WORDS if intent else BROWSE_QUERY_WORDS
        subject = self.rng.choice([products[self.rng.randrange(len(products))][0], en, zh])
        return f"{subject} {self.rng.choice(words)}"

    def session(self, customer: str, start: datetime, loyalty: float) -> list[dict[str, object]]:
        """One session's events; `loyalty` (per customer) raises the chance of a shopping session."""
        rng = self.rng
        shopper = rng.random() < min(0.9, self.p.shopper_rate * loyalty)
        self.sessions += 1
        sid = f"{self.p.merchant_id}-s{self.sessions:06d}"
        t = start
        events: list[dict[str, object]] = []

        def emit(behavior: str, **fields: object) -> None:
            nonlocal t
            t += timedelta(seconds=rng.randint(5, 240))
            events.append(
                {
                    "customer_id": customer,
                    "session_id": sid,
                    "timestamp": t.isoformat(),
                    "behavior": behavior,
                    **fields,
                }
            )

        focus = self._category()
        seen: list[dict[str, object]] = []
        if rng.random() < 0.7:  # most sessions open with a search, whatever the intent
            emit("search", query=self._query(focus, intent=rng.random() < (0.9 if shopper else 0.1)))
        for _ in range(rng.randint(2, 6)):
            category = focus if (shopper and rng.random() < 0.9) or rng.random() < 0.3 else self._category()
            r = rng.random()
            if r < 0.05 and seen:
                rating = rng.choice([5, 5, 4, 3, 2, 1])  # reviewing an earlier purchase
                emit(
                    "review", **rng.choice(seen), rating=rating, review_text=rng.choice(REVIEW_TEXTS[rating])
                )
            elif r < 0.35:
                emit("search", query=self._query(category, intent=rng.random() < (0.9 if shopper else 0.1)))
            elif seen and r < (0.6 if shopper else 0.36):
                emit("view", **rng.choice(seen))  # revisiting an item
            elif seen and r < (0.75 if shopper else 0.4):
                emit("fav", **rng.choice(seen))
            else:
                item = self._item(category)
                seen.append(item)
                emit("view", **item)
        if seen and rng.random() < (0.8 if shopper else 0.12):
            item = seen[-1] if shopper else rng.choice(seen)
            emit("cart", **item)
            if rng.random() < (0.8 if shopper else 0.25):
                emit("buy", **item)
        return events


def generate_merchant(
    seed: int,
    index: int,
    out_dir: Path,
    *,
    base_customers: int = 500,
    max_epsilon: float = 8.0,
    delta: float = 1e-6,
) -> MerchantProfile:
    """Write merchant `index`'s events and settings to `out_dir` (atomically; idempotent)."""
    profile = merchant_profile(seed, index, base_customers)
    rng = random.Random(f"events:{seed}:{index}")
    writer = _SessionWriter(profile, rng)
    lines: list[str] = []
    for c in range(profile.customers):
        customer = f"c{c:05d}"
        loyalty = math.exp(rng.gauss(0.0, 0.4))
        t = EPOCH + timedelta(days=rng.uniform(0, 30))
        for _ in range(rng.randint(1, 5)):
            for event in writer.session(customer, t, loyalty):
                lines.append(json.dumps(event, ensure_ascii=False))
            t += timedelta(days=rng.uniform(0.5, 10))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / EVENTS_FILE, ("\n".join(lines) + "\n").encode("utf-8"))
    atomic_write_json(
        out_dir / SETTINGS_FILE,
        {
            "merchant_id": profile.merchant_id,
            "max_epsilon": max_epsilon,
            "delta": delta,
        },
    )
    return profile


def ensure_merchant(seed: int, index: int, out_dir: Path, *, base_customers: int = 500) -> Path:
    """Generate merchant `index` into `out_dir` unless its data (events or an ingested store) is there."""
    has_data = (out_dir / EVENTS_FILE).exists() or (out_dir / "store").is_dir()
    if not has_data or not (out_dir / SETTINGS_FILE).exists():
        generate_merchant(seed, index, out_dir, base_customers=base_customers)
    return out_dir
