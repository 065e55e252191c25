"""Helpers shared by the tests/test_ingest_*.py files: fixture writing and the ingest invariants."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from client.ingest import QUARANTINE_SCHEMA, STORE_SCHEMA, IngestReport, Reason

REASONS = {r.value for r in Reason}


def write(path: Path, content: str | bytes) -> Path:
    """Write a fixture file (text as UTF-8, exactly as given: no newline translation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_lines(content: bytes, header: bool = False) -> int:
    """Rows of a text source as ingest counts them: every line, the header not included."""
    lines = content.split(b"\n")
    if content.endswith(b"\n") or not content:
        lines = lines[:-1]
    return max(0, len(lines) - (1 if header else 0))


def store(out: Path) -> list[dict[str, Any]]:
    """The store's rows, in source row order."""
    table = pq.read_table(out / "store")
    assert table.schema.equals(STORE_SCHEMA), table.schema
    return sorted(table.to_pylist(), key=lambda r: (r["source_row"], r["behavior"]))


def quarantine(out: Path) -> list[dict[str, Any]]:
    """The quarantine's rows."""
    table = pq.read_table(out / "quarantine.parquet")
    assert table.schema.equals(QUARANTINE_SCHEMA), table.schema
    return table.to_pylist()


def check_accounting(
    report: IngestReport, out: Path, rows_per_file: dict[str, int], file_of: Any = None
) -> None:
    """good + quarantined = total, and every source row is in exactly one of store and quarantine.

    `file_of(store_row)` names the file a store row came from (default: the only file)."""
    only = next(iter(rows_per_file)) if len(rows_per_file) == 1 else None
    assert report.total == sum(rows_per_file.values())
    assert report.good + report.quarantined == report.total
    assert report.files == rows_per_file
    good, bad = store(out), quarantine(out)
    assert len(good) == report.good and len(bad) == report.quarantined
    assert sum(report.reasons.values()) == report.quarantined
    assert Counter(r["reason"] for r in bad) == Counter(report.reasons)
    seen = Counter((file_of(r) if file_of else only, r["source_row"]) for r in good)
    seen.update((r["source_file"], r["source_row"]) for r in bad)
    expected = Counter((f, i) for f, n in rows_per_file.items() for i in range(1, n + 1))
    assert seen == expected
    for row in bad:
        assert row["reason"] in REASONS and row["detail"], row
    for row in good:
        assert row["customer_id"] and row["session_id"] and row["timestamp"] is not None
        assert row["behavior"] in {"view", "fav", "cart", "buy", "search", "review", "other"}
