"""A web-shop export as it comes (gzipped, its own event names, no item ids, attribute columns) drives
the simulation end to end, for purchase-intent and for the merchant-labelled customer-label task."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import pytest

from client.ingest.cli import copy_labels
from client.ingest.run import ingest
from simulations.split import split_store

PAGES = ["home", "catalog", "search", "filter_results", "product_view", "promo_page"]
FUNNEL = ["add_to_cart", "shipping_details", "payment_details", "purchase"]
ROLES = {"product_view": "view", "add_to_cart": "cart", "shipping_details": "cart", "purchase": "buy"}
MAP = {"customer_id": "user_id", "session_id": "session_id", "timestamp": "timestamp", "behavior": "event"}


def write_export(path: Path, customers: int = 120) -> dict[str, str]:
    """A gzipped clickstream; returns each customer's segment (buyers are 'loyal')."""
    rng = random.Random(3)
    rows = ["user_id,session_id,event,timestamp,platform,acquisition_channel,user_lifecycle"]
    segments = {}
    for u in range(customers):
        platform, channel = rng.choice(["mobile", "desktop"]), rng.choice(["ads", "organic", "email"])
        buyer = rng.random() < 0.4
        segments[f"u{u}"] = "loyal" if buyer else "browser"
        t = 1_709_000_000 + u * 5_000
        for s in range(rng.randint(1, 3)):
            events = [rng.choice(PAGES) for _ in range(rng.randint(2, 7))]
            if buyer and rng.random() < 0.7:
                events += FUNNEL
            for i, event in enumerate(events):
                lifecycle = "returning" if s else "new"
                rows.append(f"u{u},s{s},{event},{t + s * 90_000 + 20 * i},{platform},{channel},{lifecycle}")
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    return segments


def _simulate(tmp_path: Path, tiny_bert: str, name: str, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One round over two merchants split from the ingested export, in folders of their own (each run
    spends the merchants' whole budget: a second run on the same folders is refused, as it should)."""
    split_store(tmp_path / "ingested", tmp_path / name, merchants=2, by="acquisition_channel")
    from simulations.run import simulate

    run_dir = simulate(
        {
            "backbone": tiny_bert,
            "num-rounds": 1,
            "min-train-nodes": 2,
            "min-evaluate-nodes": 2,
            "min-available-nodes": 2,
            "runs-dir": str(tmp_path / "runs"),
            "run-name": name,
            "sim-root": str(tmp_path / name),
            "batch-size": 16,
            "max-length": 32,
            "lora-r": 2,
            **extra,
        },
        merchants=2,
    )
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_simulation_on_an_ingested_web_shop_export(tmp_path: Path, tiny_bert: str) -> None:
    segments = write_export(tmp_path / "export.csv.gz")
    report = ingest(
        tmp_path / "export.csv.gz",
        "csv",
        tmp_path / "ingested",
        mapping=MAP,
        behavior_map=ROLES,
        attributes=("platform", "user_lifecycle", "acquisition_channel"),
    )
    assert report.quarantined == 0 and report.unmapped_events["payment_details"] > 0
    labels = tmp_path / "segments.csv"
    labels.write_text(
        "customer_id,label\n" + "".join(f"{c},{s}\n" for c, s in segments.items()) + "ghost,loyal\n"
    )
    copy_labels(labels, tmp_path / "ingested")

    rows = _simulate(tmp_path, tiny_bert, "purchase", {})
    assert [r["round"] for r in rows] == [0, 1]
    assert {m["status"] for m in rows[1]["merchants"].values()} == {"trained"}

    rows = _simulate(
        tmp_path, tiny_bert, "segments", {"task": "customer-label", "customer-labels": "loyal,browser"}
    )
    assert {m["status"] for m in rows[1]["merchants"].values()} == {"trained"}
    assert rows[1]["global"]["examples"] >= 0  # a noisy count (σ 20 per histogram cell), clipped at 0
    # every merchant got only its own customers' labels: the ghost row went nowhere
    for m in (0, 1):
        text = (tmp_path / "segments" / f"merchant-{m}" / "labels.csv").read_text()
        assert "ghost" not in text and text.startswith("customer_id,label")
