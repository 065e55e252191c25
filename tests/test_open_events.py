"""Real exports as they come: open event names, no item ids, attribute columns, compressed files,
the preview a privacy officer reads, and the merchant's own labels (customer-label, repeat-purchase)."""

from __future__ import annotations

import bz2
import gzip
import json
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from client.ingest import IngestError
from client.ingest.labels import load_labels
from client.ingest.run import ingest
from shared.candidates import build_candidates
from shared.config import RunConfig
from shared.customer_tasks import LabelSet
from shared.schema import Event
from shared.tasks import get_task, purchase_intent
from shared.text import serialize
from tests.ingest_helpers import check_accounting, quarantine, store

HEADER = "user_id,session_id,event,timestamp,platform,acquisition_channel,user_lifecycle\n"
ROWS = [
    "u1,s1,home,2024-03-01T10:00:00Z,mobile,ads,new",
    "u1,s1,promo_page,2024-03-01T10:00:30Z,mobile,ads,new",
    "u1,s1,product_view,2024-03-01T10:01:00Z,mobile,ads,new",
    "u1,s1,shipping_details,2024-03-01T10:02:00Z,mobile,ads,new",
    "u1,s1,purchase,2024-03-01T10:03:00Z,mobile,ads,new",
    "u2,s1,catalog,2024-03-01T11:00:00Z,desktop,organic,returning",  # same session id, other customer
    "u2,s1,filter_results,2024-03-01T11:00:10Z,desktop,organic,returning",
    "u2,s1,search,2024-03-01T11:00:20Z,desktop,organic,",  # a search without query text, one attribute empty
    "u2,s1,filter_results,2024-03-01T11:00:10Z,desktop,organic,returning",  # duplicate of row 7
    "u3,s9,home,yesterday,mobile,ads,new",  # bad timestamp
]
ROLES = {"product_view": "view", "add_to_cart": "cart", "shipping_details": "cart", "purchase": "buy"}
MAP = {"customer_id": "user_id", "session_id": "session_id", "timestamp": "timestamp", "behavior": "event"}
ATTRS = ("platform", "user_lifecycle")


def _export() -> bytes:
    return (HEADER + "\n".join(ROWS) + "\n").encode()


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return bytes(sink.getvalue())


COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".zst": _zstd, "": lambda b: b}


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_compressed_export_with_open_vocabulary_quarantines_only_true_defects(
    tmp_path: Path, suffix: str
) -> None:
    src = tmp_path / f"export.csv{suffix}"
    src.write_bytes(COMPRESSORS[suffix](_export()))
    out = tmp_path / "m"
    report = ingest(src, "generic", out, mapping=MAP, behavior_map=ROLES, attributes=ATTRS)
    check_accounting(report, out, {src.name: len(ROWS)})
    assert {r["source_row"]: r["reason"] for r in quarantine(out)} == {9: "duplicate", 10: "bad_timestamp"}
    assert report.unmapped_events == {"filter_results": 1, "catalog": 1, "home": 1, "promo_page": 1}
    rows = store(out)
    assert [(r["event_name"], r["behavior"]) for r in rows[:5]] == [
        ("home", "other"),
        ("promo_page", "other"),
        ("product_view", "view"),
        ("shipping_details", "cart"),
        ("purchase", "buy"),
    ]
    assert rows[0]["attributes"] == "platform=mobile | user_lifecycle=new"
    assert rows[7]["attributes"] == "platform=desktop" and rows[7]["item_id"] is None
    assert report.sessions == 2 and report.customers == 2  # s1 of u1 and s1 of u2 are two sessions


def test_non_text_and_misnamed_files(tmp_path: Path) -> None:
    archive = tmp_path / "export.csv"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("export.csv", _export())
    with pytest.raises(IngestError, match="zip archive"):
        ingest(archive, "csv", tmp_path / "z", mapping=MAP)
    misnamed = tmp_path / "plain.csv"  # gzip bytes without the extension: read all the same
    misnamed.write_bytes(gzip.compress(_export()))
    assert ingest(misnamed, "csv", tmp_path / "g", mapping=MAP).good == len(ROWS) - 2
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes(_export().decode().encode("utf-16"))
    with pytest.raises(IngestError, match="not a UTF-8 text export"):
        ingest(utf16, "csv", tmp_path / "u", mapping=MAP)


def test_preview_shows_event_names_attributes_and_labels(tmp_path: Path, tiny_bert: str) -> None:
    from client.ingest.preview import preview

    src = tmp_path / "export.csv.gz"
    src.write_bytes(gzip.compress(_export()))
    ingest(src, "csv", tmp_path / "m", mapping=MAP, behavior_map=ROLES, attributes=ATTRS)
    cfg = RunConfig.parse({"backbone": tiny_bert, "max-length": 64})
    result = preview(tmp_path / "m", cfg, limit=5, eval_fraction=0.5)
    texts = {row["customer_id"]: row for row in result["shown"]}
    # u1's prefix stops before shipping_details (role cart); its own names and attributes are in it
    assert texts["u1"]["text"] == "mobile new ; home ; promo page ; product view"
    assert texts["u1"]["label"] == "buy"
    assert texts["u2"]["text"] == "desktop ; catalog ; filter results ; search"
    assert texts["u2"]["label"] == "no-buy"
    assert not list((tmp_path / "m").glob("*quarantine.jsonl"))  # preview writes nothing


def _events(rows: list[tuple[str, str, int, str]]) -> list[Event]:
    base = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [
        Event(customer_id=c, session_id=s, timestamp=base + timedelta(days=d), behavior=b, event_name=b)
        for c, s, d, b in rows
    ]


def test_leak_roles_end_the_purchase_prefix() -> None:
    session = _events(
        [("c", "s", 0, "view"), ("c", "s", 0, "fav"), ("c", "s", 0, "view"), ("c", "s", 0, "buy")]
    )
    default = purchase_intent(session, get_task("purchase-intent"))
    with_fav = purchase_intent(session, get_task("purchase-intent", leak_roles=("cart", "fav")))
    assert not isinstance(default, str) and not isinstance(with_fav, str)
    assert [e.behavior.value for e in with_fav[0]] == ["view"] and with_fav[1] == 1
    assert len(default[0]) >= 2  # fav is no leak by default
    with pytest.raises(ValueError, match="'shipping' is not a funnel role"):
        RunConfig.parse({"leak-roles": "cart,shipping"})


def test_repeat_purchase_labels_and_time_split() -> None:
    events = _events(
        [
            ("a", "1", 0, "view"),
            ("a", "1", 1, "buy"),
            ("a", "2", 20, "buy"),  # within 30 days: repeat
            ("b", "1", 0, "buy"),
            ("b", "2", 45, "buy"),  # after 30 days: no repeat
            ("c", "1", 0, "view"),  # never bought: no example
        ]
    )
    task = RunConfig.parse({"task": "repeat-purchase", "repeat-days": 30}).task_spec
    candidates, stats = build_candidates(task, events)
    assert {c: [x.label for x in xs] for c, xs in candidates.items()} == {"a": [1], "b": [0]}
    assert [e.behavior.value for e in candidates["a"][0].prefix] == ["view", "buy"]  # up to the first buy
    assert stats.skipped == {"never-bought": 1}
    # the label window is the example's end: a time split never trains on a window still open
    assert candidates["a"][0].ends_at == datetime(2024, 2, 1, tzinfo=timezone.utc)  # bought Jan 2, +30 d


def _write_labels(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_labels_file_quarantines_unknown_customers_and_labels(tmp_path: Path) -> None:
    events = _events(
        [("a", "1", 0, "view"), ("b", "1", 0, "view"), ("b", "2", 3, "view"), ("c", "7", 0, "view")]
    )
    path = _write_labels(
        tmp_path / "labels.csv",
        "customer_id,label\na,loyal\nb,churned\nz,loyal\nc,platinum\nc,\na,churned\n",
    )
    labels, report = load_labels(path, events, ("loyal", "at-risk", "churned"), tmp_path)
    assert labels.by_customer == {"a": 0, "b": 2}
    assert report.total == 6 and report.good == 2 and report.quarantined == 4
    assert report.reasons == {"unknown_customer": 1, "unknown_label": 1, "missing_label": 1, "duplicate": 1}
    lines = [json.loads(x) for x in (tmp_path / "labels-quarantine.jsonl").read_text().splitlines()]
    assert [(x["line"], x["reason"]) for x in lines] == [
        (4, "unknown_customer"),
        (5, "unknown_label"),
        (6, "missing_label"),
        (7, "duplicate"),
    ]
    # session labels: an id alone that two customers use is ambiguous
    path = _write_labels(tmp_path / "s.csv", "session_id,label\n1,loyal\n2,at-risk\n9,loyal\n")
    labels, report = load_labels(path, events, ("loyal", "at-risk"), tmp_path)
    assert labels.by_session == {("b", "2"): 1}
    assert report.reasons == {"ambiguous_session": 1, "unknown_session": 1}


def test_customer_label_examples_are_the_customers_recent_events() -> None:
    events = _events([("a", "1", 0, "view"), ("a", "2", 5, "cart"), ("b", "1", 0, "search")])
    task = get_task("customer-label", customer_labels=("loyal", "churned"))
    candidates, stats = build_candidates(task, events, labels=LabelSet(by_customer={"a": 1}))
    assert list(candidates) == ["a"] and candidates["a"][0].label == 1
    assert serialize(candidates["a"][0].prefix, max_tokens=20) == "view ; cart"
    assert stats.skipped == {"no-label": 1}
    with pytest.raises(ValueError, match="customer-labels"):
        RunConfig.parse({"task": "customer-label"})
