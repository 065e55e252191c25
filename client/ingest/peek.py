"""A first look at a shop's export: its column names, first row and delimiter, to check a mapping
against before anything is read in bulk (`client.ingest.formats.generic_layout`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from client.ingest.lines import read_header
from client.ingest.schema import IngestError
from client.ingest.sources import check_text, open_source, sample

_SAMPLE_BYTES = 1 << 20
_DELIMITERS = (",", "\t", ";", "|")


def _sample(path: Path) -> bytes:
    return sample(path, _SAMPLE_BYTES)[0]


def peek_columns(path: Path, kind: str) -> tuple[list[str], dict[str, Any] | None, str]:
    """Column names, first row and delimiter of a generic export, for checking a mapping."""
    if kind == "parquet":
        try:
            pfile = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise IngestError(f"{path.name} is not a readable Parquet file: {err}") from None
        first = next(pfile.iter_batches(batch_size=1), None)
        return pfile.schema_arrow.names, (first.to_pylist()[0] if first and first.num_rows else None), ","
    check_text(path, _sample(path))
    if kind == "jsonl":
        return _peek_jsonl(path)
    with open_source(path) as handle:
        header = read_header(handle).decode("utf-8", "replace")
        first_line = handle.readline().rstrip(b"\r\n").decode("utf-8", "replace")
    delimiter = max(_DELIMITERS, key=header.count)
    names = next(csv.reader([header], delimiter=delimiter), [])
    if len(set(names)) != len(names) or not all(names):
        raise IngestError(f"{path.name}: the header needs distinct, non-empty column names; found {header!r}")
    values = next(csv.reader([first_line], delimiter=delimiter), [])
    return names, (dict(zip(names, values, strict=False)) if first_line else None), delimiter


def _peek_jsonl(path: Path) -> tuple[list[str], dict[str, Any] | None, str]:
    names: dict[str, None] = {}
    first: dict[str, Any] | None = None
    for line in _sample(path).splitlines()[:10_000]:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            first = first or obj
            names.update(dict.fromkeys(obj))
    return list(names), first, ","
