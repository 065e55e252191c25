"""Synthetic merchants: deterministic from a seed, non-IID, valid events, a learnable purchase signal."""

from __future__ import annotations

import json
from pathlib import Path

from client.ingest.data import load_events
from shared.schema import Behavior
from simulations.synthetic import EVENTS_FILE, SETTINGS_FILE, generate_merchant, merchant_profile


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    generate_merchant(11, 2, tmp_path / "a", base_customers=40)
    generate_merchant(11, 2, tmp_path / "b", base_customers=40)
    assert (tmp_path / "a" / EVENTS_FILE).read_bytes() == (tmp_path / "b" / EVENTS_FILE).read_bytes()
    generate_merchant(12, 2, tmp_path / "c", base_customers=40)
    assert (tmp_path / "a" / EVENTS_FILE).read_bytes() != (tmp_path / "c" / EVENTS_FILE).read_bytes()


def test_merchants_are_non_iid() -> None:
    profiles = [merchant_profile(7, i, 500) for i in range(4)]
    assert len({p.customers for p in profiles}) == 4
    assert len({round(p.price_level, 3) for p in profiles}) == 4
    top = {max(p.category_weights, key=p.category_weights.__getitem__) for p in profiles}
    assert len(top) >= 2  # different favourite categories


def test_events_validate_and_funnels_are_realistic(tmp_path: Path) -> None:
    generate_merchant(7, 0, tmp_path, base_customers=120)
    events, report = load_events(tmp_path, tmp_path / "state")
    assert report.quarantined == 0 and report.good == report.total > 0
    counts = {b: sum(e.behavior is b for e in events) for b in Behavior}
    assert counts[Behavior.VIEW] > counts[Behavior.CART] > counts[Behavior.BUY] > 0
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in (e.title or "")) for e in events)  # Chinese titles
    assert any((e.title or "").isascii() and e.title for e in events)  # and English ones
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert settings == {"merchant_id": "merchant-0", "max_epsilon": 8.0, "delta": 1e-6}
