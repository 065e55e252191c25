"""Sessionisation, duplicates, partitioning and the vectorised converters of client.ingest."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.ingest import ingest
from client.ingest.convert import as_epoch_ms, as_price, as_text
from client.ingest.store import partition_of
from tests.ingest_helpers import check_accounting, quarantine, store, write

T0 = 1_700_000_000


def taobao(rows: list[tuple[str, str, str, int]]) -> str:
    """Taobao lines from (user, item, behaviour, unix seconds)."""
    return "".join(f"{u},{i},1,{b},{t}\n" for u, i, b, t in rows)


def test_gap_boundary_and_unsorted_input(tmp_path: Path) -> None:
    rows = [
        ("9", "c", "pv", T0 + 1800 + 1800 + 1),  # a new session: gap 1801 s
        ("9", "a", "pv", T0),
        ("9", "b", "pv", T0 + 1800),  # exactly the gap: same session
        ("8", "z", "pv", T0 + 1),
    ]
    src = write(tmp_path / "UserBehavior.csv", taobao(rows))
    report = ingest(src, "taobao", tmp_path / "out")
    sessions = {r["item_id"]: r["session_id"] for r in store(tmp_path / "out")}
    assert sessions == {"a": f"9:{T0}000", "b": f"9:{T0}000", "c": f"9:{T0 + 3601}000", "z": f"8:{T0 + 1}000"}
    assert report.sessions == 3 and report.customers == 2
    ingest(src, "taobao", tmp_path / "short", session_gap_s=60)
    assert len({r["session_id"] for r in store(tmp_path / "short")}) == 4


def test_same_result_whatever_the_batching_and_partitions(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = [
        (
            f"u{rng.randrange(40)}",
            f"i{rng.randrange(9)}",
            rng.choice(["pv", "cart", "buy"]),
            T0 + rng.randrange(20_000),
        )
        for _ in range(600)
    ]
    rows += rows[:30]  # exact duplicates, far from their originals
    src = write(tmp_path / "UserBehavior.csv", taobao(rows))
    one = ingest(src, "taobao", tmp_path / "one")
    many = ingest(src, "taobao", tmp_path / "many", batch_rows=7)
    assert one.partitions == 1 and many.partitions > 10
    assert store(tmp_path / "one") == store(tmp_path / "many")
    assert sorted(map(str, quarantine(tmp_path / "one"))) == sorted(map(str, quarantine(tmp_path / "many")))
    assert (one.sessions, one.customers, one.reasons) == (many.sessions, many.customers, many.reasons)
    check_accounting(many, tmp_path / "many", {"UserBehavior.csv": 630})
    assert many.reasons.get("duplicate", 0) >= 30
    by_customer: dict[str, set[str]] = {}
    for name in many.store_files:  # every customer lives in exactly one part
        for cid in set(pq.read_table(tmp_path / "many" / name)["customer_id"].to_pylist()):
            by_customer.setdefault(cid, set()).add(name)
    assert all(len(parts) == 1 for parts in by_customer.values())


def test_duplicates_need_every_column_equal(tmp_path: Path) -> None:
    rows = [
        ("1", "a", "pv", T0),
        ("1", "b", "pv", T0),  # same time, other item: not a duplicate
        ("1", "a", "pv", T0),  # duplicate of row 1, not adjacent to it
        ("1", "a", "buy", T0),  # other behaviour: not a duplicate
        ("1", "a", "pv", T0),  # duplicate again
    ]
    src = write(tmp_path / "UserBehavior.csv", taobao(rows))
    report = ingest(src, "taobao", tmp_path / "out")
    assert [r["source_row"] for r in store(tmp_path / "out")] == [1, 2, 4]
    assert {r["source_row"]: r["detail"] for r in quarantine(tmp_path / "out")} == {
        3: "duplicate of row 1",
        5: "duplicate of row 1",
    }
    assert report.sessions == 1


def test_source_sessions_are_kept(tmp_path: Path) -> None:
    text = (
        "c,s,t,b,i\nu1,A,2024-01-01T00:00:00Z,view,x\nu1,A,2024-01-03T00:00:00Z,view,y\n"
        "u1,B,2024-01-01T00:01:00Z,buy,x\n"
    )
    src = write(tmp_path / "e.csv", text)
    mapping = {"customer_id": "c", "session_id": "s", "timestamp": "t", "behavior": "b", "item_id": "i"}
    report = ingest(src, "csv", tmp_path / "out", mapping=mapping)
    assert [r["session_id"] for r in store(tmp_path / "out")] == ["A", "A", "B"]
    assert report.session_mode == "source" and report.sessions == 2


def test_partition_of_is_stable_and_spread() -> None:
    ids = [f"customer-{i}@example.com" for i in range(2000)] + [str(i) for i in range(2000)] + ["", "x" * 40]
    parts = partition_of(pa.array(ids), 16)
    assert parts.max() < 16 and np.bincount(parts, minlength=16).min() > 100
    sliced = partition_of(pa.array(["pad", *ids]).slice(1), 16)  # an offset array hashes the same
    assert (sliced == parts).all()
    again = partition_of(pa.chunked_array([ids[:7], ids[7:]]), 16)
    assert (again == parts).all()


def test_timestamp_conversions() -> None:
    ms = 1_396_867_869_277
    text = pa.array(
        [
            "2014-04-07T10:51:09.277Z",
            "2014-04-07T12:51:09.277+02:00",
            "2014-04-07 10:51:09.277123",
            "1396867869",
            "1396867869277",
            "1396867869277000",
            "1396867869.277",
            "2014-02-30T00:00:00Z",
            "soon",
            None,
        ]
    )
    values, bad = as_epoch_ms(text, "auto")
    assert list(values[:3]) == [ms, ms, ms] and values[3] == ms - 277 and list(values[4:7]) == [ms, ms, ms]
    assert list(bad) == [False] * 7 + [True] * 3
    secs, bad_s = as_epoch_ms(pa.array([b"1396867869", b"-1", b"1e9", b"99999999999999999999"]), "s")
    assert secs[0] == ms - 277 and list(bad_s) == [False, True, True, True]
    typed, bad_t = as_epoch_ms(pa.array([ms * 1000], pa.timestamp("us", tz="Europe/Paris")), "auto")
    assert typed[0] == ms and not bad_t.any()


def test_text_and_price_conversions() -> None:
    text, bad = as_text(pa.array([b"ok", b"", None, b"\xff\xfe"]))
    assert text.to_pylist() == ["ok", None, None, None] and list(bad) == [False, False, False, True]
    nested, bad_n = as_text(pa.array([{"a": 1}, None]))
    assert nested.to_pylist() == [None, None] and list(bad_n) == [True, False]
    price, bad_p = as_price(pa.array(["1.5", "", "-2", "nan", "1,5", None, "1e3"]))
    assert price.to_pylist() == [1.5, None, -2.0, None, None, None, 1000.0]
    assert list(bad_p) == [False, False, False, True, True, False, False]


@pytest.mark.parametrize("gap", [0, 1])
def test_zero_gap_and_equal_times(tmp_path: Path, gap: int) -> None:
    rows = [("1", "a", "pv", T0), ("1", "b", "pv", T0), ("1", "c", "pv", T0 + 1)]
    src = write(tmp_path / "UserBehavior.csv", taobao(rows))
    report = ingest(src, "taobao", tmp_path / "out", session_gap_s=gap)
    assert report.sessions == (2 if gap == 0 else 1)
