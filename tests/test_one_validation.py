"""One validation for the merchant's data: `merchant ingest`, `merchant validate-data` and `predict`
quarantine the same rows with the same reasons, a store the ingest wrote is valid for every later
reader, and every field of an event can come from a CSV column."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from client.evaluation.predict import PredictReport, read_events
from client.ingest import ingest
from client.ingest.data import QUARANTINE_FILE, load_events
from client.ingest.schema import FIELDS, STORE_SCHEMA
from shared.cli import main
from shared.schema import Event, RowReason

COLUMNS = [
    "customer_id",
    "session_id",
    "timestamp",
    "behavior",
    "item_id",
    "price",
    "rating",
    "review_text",
    "customer_segment",
]

GOOD = {
    "customer_id": "c1",
    "session_id": "s1",
    "timestamp": "2024-06-01T10:00:00+00:00",
    "behavior": "view",
    "item_id": "i1",
}

# (row, the reason every reader must give it); "" in a CSV is a missing value, as a left-out JSON key
CASES: list[tuple[dict[str, str], RowReason | None]] = [
    (GOOD, None),
    ({**GOOD, "customer_id": ""}, RowReason.MISSING_CUSTOMER_ID),
    ({**GOOD, "session_id": ""}, RowReason.MISSING_SESSION_ID),
    ({**GOOD, "timestamp": "not-a-time"}, RowReason.BAD_TIMESTAMP),
    ({**GOOD, "timestamp": "2300-01-01T00:00:00+00:00"}, RowReason.TIMESTAMP_OUT_OF_RANGE),
    ({**GOOD, "timestamp": "1970-01-02T00:00:00+00:00"}, RowReason.TIMESTAMP_OUT_OF_RANGE),
    ({**GOOD, "behavior": ""}, RowReason.UNKNOWN_BEHAVIOR),
    ({**GOOD, "behavior": "teleport"}, RowReason.UNKNOWN_BEHAVIOR),  # strict: names must be roles
    ({**GOOD, "price": "abc"}, RowReason.BAD_PRICE),
    ({**GOOD, "price": "inf"}, RowReason.BAD_PRICE),
    ({**GOOD, "price": "-1"}, RowReason.NEGATIVE_PRICE),
    ({**GOOD, "behavior": "review", "rating": "7"}, RowReason.BAD_RATING),
    ({**GOOD, "behavior": "review", "rating": "4.5"}, RowReason.BAD_RATING),
    ({**GOOD, "behavior": "review", "rating": "0"}, RowReason.BAD_RATING),
    ({**GOOD, "behavior": "review"}, RowReason.EMPTY_REVIEW),
    ({**GOOD, "behavior": "review", "rating": "4"}, None),
    ({**GOOD, "behavior": "review", "review_text": "fits well"}, None),
    ({**GOOD, "price": "19.9", "customer_segment": "gold"}, None),
    # several faults: the reason of highest precedence, whoever reads it
    ({**GOOD, "customer_id": "", "timestamp": "not-a-time", "price": "-1"}, RowReason.MISSING_CUSTOMER_ID),
    ({**GOOD, "timestamp": "2300-01-01T00:00:00+00:00", "price": "-1"}, RowReason.TIMESTAMP_OUT_OF_RANGE),
    ({**GOOD, "behavior": "review", "price": "-1"}, RowReason.NEGATIVE_PRICE),
]


def _csv(path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row, _ in CASES:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def _jsonl_folder(folder: Path) -> Path:
    """The same rows in the native format (`events.jsonl`), missing values left out."""
    folder.mkdir(parents=True)
    lines = [json.dumps({k: v for k, v in row.items() if v != ""}) for row, _ in CASES]
    (folder / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "merchant.json").write_text(json.dumps({"merchant_id": "m"}), encoding="utf-8")
    return folder


def _expected() -> dict[int, str]:
    """Reason per row, rows numbered from 1 (the CSV's data rows; the JSON Lines' lines)."""
    return {i: reason.value for i, (_, reason) in enumerate(CASES, start=1) if reason is not None}


def _ingest_reasons(out: Path) -> dict[int, str]:
    rows = pq.read_table(out / "quarantine.parquet").to_pylist()
    return {int(r["source_row"]): r["reason"] for r in rows}


def _jsonl_reasons(quarantine: Path) -> dict[int, str]:
    lines = quarantine.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert all(r["detail"] for r in records)
    return {int(r["line"]): r["reason"] for r in records}


def test_ingest_validate_and_predict_quarantine_the_same_rows_for_the_same_reasons(tmp_path: Path) -> None:
    source = _csv(tmp_path / "export.csv")
    report = ingest(source, "csv", tmp_path / "store", strict=True)
    assert _ingest_reasons(tmp_path / "store") == _expected()
    assert report.reasons == {r: list(_expected().values()).count(r) for r in set(_expected().values())}

    # validate-data on the native format (the command, as a merchant runs it): exit 1, same rows
    folder = _jsonl_folder(tmp_path / "merchant")
    assert main(["merchant", "validate-data", str(folder)]) == 1
    assert _jsonl_reasons(folder / "state" / QUARANTINE_FILE) == _expected()

    # predict reads either: a CSV through the ingest, a data folder through load_events
    for given in (source, folder):
        work = tmp_path / f"predict-{given.name}"
        work.mkdir()
        scored = PredictReport(out="-", device="cpu")
        events, quarantine = read_events(
            given, work, scored, fmt="csv", mapping=None, behavior_map=None, attributes=(), strict=True
        )
        assert scored.quarantined == len(_expected()) and len(events) == len(CASES) - len(_expected())
        found = _ingest_reasons(work / "ingested") if quarantine.suffix == ".parquet" else None
        assert (found or _jsonl_reasons(quarantine)) == _expected()


def test_a_store_the_ingest_wrote_is_valid_for_every_later_reader(tmp_path: Path) -> None:
    """What the issue found: ingest accepted 190 review rows that validate-data then quarantined."""
    report = ingest(_csv(tmp_path / "export.csv"), "csv", tmp_path / "store", strict=True)
    events, loaded = load_events(tmp_path / "store", tmp_path / "state")
    assert (loaded.total, loaded.good, loaded.quarantined) == (report.good, report.good, 0)
    reviews = {(e.rating, e.review_text) for e in events if e.behavior.value == "review"}
    assert reviews == {(None, "fits well"), (4, None)}


def test_every_event_field_can_be_mapped_from_a_csv_column(tmp_path: Path) -> None:
    mappable = set(Event.model_fields) - {"attributes"}  # --attribute builds it from any columns
    assert mappable == set(FIELDS)
    assert mappable <= set(STORE_SCHEMA.names)
    row = {
        "user": "c9",
        "visit": "v1",
        "when": "2024-06-01T10:00:00+00:00",
        "what": "review",
        "name": "product_review",
        "sku": "i9",
        "headline": "Trail shoe",
        "dept": "shoes",
        "cost": "59.5",
        "searched": "trail shoes",
        "words": "fits well",
        "stars": "5",
        "tier": "gold",
        "area": "north",
        "age": "25-34",
    }
    mapping = dict(
        zip(
            [
                "customer_id",
                "session_id",
                "timestamp",
                "behavior",
                "event_name",
                "item_id",
                "title",
                "category",
                "price",
                "query",
                "review_text",
                "rating",
                "customer_segment",
                "customer_region",
                "customer_age_band",
            ],
            row,
            strict=True,
        )
    )
    assert set(mapping) == set(FIELDS)
    path = tmp_path / "full.csv"
    path.write_text(",".join(row) + "\n" + ",".join(row.values()) + "\n", encoding="utf-8")
    ingest(path, "csv", tmp_path / "out", mapping=mapping)
    (event,), _ = load_events(tmp_path / "out", tmp_path / "state")
    expected = Event.model_validate({field: row[column] for field, column in mapping.items()})
    assert event == expected
    assert (event.rating, event.review_text, event.customer_age_band) == (5, "fits well", "25-34")


@pytest.mark.parametrize("value", ["5.0", "5"])
def test_a_whole_rating_written_as_a_decimal_is_accepted(tmp_path: Path, value: str) -> None:
    path = tmp_path / "r.csv"
    path.write_text(
        "customer_id,timestamp,behavior,rating\nc1,2024-06-01T10:00:00Z,review," + value + "\n",
        encoding="utf-8",
    )
    ingest(path, "csv", tmp_path / "out")
    (event,), _ = load_events(tmp_path / "out", tmp_path / "state")
    assert event.rating == 5
