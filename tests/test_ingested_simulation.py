"""A real-format dataset drives the simulation: Taobao CSV → ingest → split into merchants → train."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from client.ingest.data import load_events
from client.ingest.run import ingest
from simulations.split import split_store


def write_taobao(path: Path, customers: int = 150) -> int:
    """UserBehavior.csv rows: user,item,category,pv|fav|cart|buy,unix seconds; shoppers revisit and buy."""
    rng = random.Random(0)
    rows = []
    for user in range(customers):
        t = 1_511_000_000 + rng.randint(0, 500_000)
        for _ in range(rng.randint(1, 4)):
            shopper = rng.random() < 0.4
            category = rng.choice([2520377, 4145813, 1320293]) if shopper else rng.randint(1, 9999)
            for _ in range(rng.randint(2, 6)):
                rows.append(f"{user},{rng.randint(1, 50)},{category},pv,{t}")
                t += rng.randint(10, 300)
            if shopper and rng.random() < 0.8:
                rows.append(f"{user},7,{category},cart,{t}")
                rows.append(f"{user},7,{category},buy,{t + 60}")
            t += 86_400
    rows.append("not,a,valid,row")  # quarantined, counted
    path.write_text("\n".join(rows) + "\n")
    return len(rows)


def test_split_assigns_every_customer_to_one_merchant(tmp_path: Path) -> None:
    total = write_taobao(tmp_path / "UserBehavior.csv")
    report = ingest(tmp_path / "UserBehavior.csv", "taobao", tmp_path / "ingested")
    assert report.good + report.quarantined == total and report.quarantined == 1
    folders = split_store(tmp_path / "ingested", tmp_path / "merchants", merchants=3)
    seen: dict[str, int] = {}
    rows = 0
    for m, folder in enumerate(folders):
        table = pq.read_table(folder / "store" / "part-00000.parquet")
        rows += table.num_rows
        for customer in set(table["customer_id"].to_pylist()):
            assert seen.setdefault(customer, m) == m
        events, load = load_events(folder, folder / "state")
        assert load.quarantined == 0 and len(events) == table.num_rows
    assert rows == report.good and len(seen) == 150
    with pytest.raises(ValueError, match="cannot split by"):
        split_store(tmp_path / "ingested", tmp_path / "x", merchants=2, by="region")


@pytest.mark.slow
def test_simulation_runs_on_an_ingested_dataset(tmp_path: Path, tiny_bert: str) -> None:
    from simulations.run import simulate

    write_taobao(tmp_path / "UserBehavior.csv", customers=180)
    ingest(tmp_path / "UserBehavior.csv", "taobao", tmp_path / "ingested")
    split_store(tmp_path / "ingested", tmp_path / "merchants", merchants=3)
    run_dir = simulate(
        {
            "backbone": tiny_bert,
            "num-rounds": 1,
            "min-train-nodes": 3,
            "min-evaluate-nodes": 3,
            "min-available-nodes": 3,
            "runs-dir": str(tmp_path / "runs"),
            "run-name": "taobao",
            "sim-root": str(tmp_path / "merchants"),
            "batch-size": 16,
            "max-length": 32,
            "lora-r": 2,
        },
        merchants=3,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert {m["status"] for m in rows[1]["merchants"].values()} == {"trained"}
    assert not (tmp_path / "merchants" / "merchant-0" / "events.jsonl").exists()  # no synthetic data
