"""Streaming readers: each yields `RawBatch`es of about `batch_rows` rows with their source row numbers.

Text sources (delimited, JSON Lines) count every line as a row, header excluded: source_row is the
1-based line number of a headerless file and the line number minus one of a file with a header. Parquet
rows are numbered from 1 in file order. Memory is bounded by the batch size, whatever the file size.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pjson
import pyarrow.parquet as pq

from client.ingest.formats import FileLayout
from client.ingest.lines import (
    BOM,
    Chunk,
    count_lines,
    iter_blocks,
    iter_chunks,
    line_spans,
    parse_delimited,
    read_header,
)
from client.ingest.schema import IngestError, Reason, empty_quarantine, quarantine_table
from client.ingest.sources import open_source, sample

T = TypeVar("T")
_SAMPLE_BYTES = 1 << 20


@dataclass
class RawBatch:
    """Source columns as read (binary for text files, typed for Parquet/JSON) and their row numbers."""

    layout: FileLayout
    table: pa.Table
    rows: np.ndarray
    rejected: pa.Table  # rows the reader could not even split into columns
    raw: Callable[[np.ndarray], list[str]]  # the source text of rows (by position in `table`)


def _sample(path: Path) -> bytes:
    return sample(path, _SAMPLE_BYTES)[0]


def estimate_rows(layout: FileLayout) -> int:
    """Rows in the file: exact for Parquet, estimated from the first megabyte for text (through the
    compression ratio seen there for a compressed file)."""
    if layout.kind == "parquet":
        return int(pq.ParquetFile(layout.path).metadata.num_rows)
    head, ratio = sample(layout.path, _SAMPLE_BYTES)
    lines = max(1, count_lines(head))
    return int(layout.path.stat().st_size * ratio / max(1.0, len(head) / lines)) + 1


def chunk_bytes(layout: FileLayout, batch_rows: int) -> int:
    """Bytes per text chunk so that a chunk holds about `batch_rows` lines."""
    sample = _sample(layout.path)
    per_line = len(sample) / max(1, count_lines(sample))
    return int(min(256 << 20, max(256, batch_rows * per_line)))


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """`items`, produced one ahead on a worker thread: the next chunk is read and parsed (pyarrow
    releases the GIL) while the caller validates the current one."""
    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix="ingest-read") as pool:
        future = pool.submit(next, items, done)
        while True:
            item = future.result()
            if item is done:
                return
            future = pool.submit(next, items, done)
            yield item  # type: ignore[misc]


def iter_batches(layout: FileLayout, batch_rows: int) -> Iterator[RawBatch]:
    """The file's rows in batches of about `batch_rows`."""
    if layout.kind == "parquet":
        return _parquet_batches(layout, batch_rows)
    if layout.kind == "jsonl":
        return _jsonl_batches(layout, batch_rows)
    return _delimited_batches(layout, batch_rows)


def _skip_bom(handle: BinaryIO) -> None:
    """Step over a UTF-8 byte order mark, if the stream starts with one (works on unseekable streams)."""
    if isinstance(handle, io.BufferedReader):
        if handle.peek(3)[:3] == BOM:
            handle.read(3)
    elif handle.read(3) != BOM:
        handle.seek(0)


def _header(layout: FileLayout, handle: BinaryIO) -> list[str]:
    """Read and check the header line; the handle is left at the first data line."""
    text = read_header(handle).decode("utf-8", "replace")
    header = next(csv.reader([text], delimiter=layout.delimiter), [])
    missing = [c for c in layout.read_columns if c not in header]
    if missing:
        first = handle.readline().rstrip(b"\r\n").decode("utf-8", "replace")  # the error ends the read
        raise IngestError(
            f"{layout.path.name}: column {missing[0]!r} is not in the header; expected "
            f"{layout.delimiter.join(layout.columns)!r}, found {text!r}; first row: {first!r}"
        )
    return header


def _delimited_batches(layout: FileLayout, batch_rows: int) -> Iterator[RawBatch]:
    size = chunk_bytes(layout, batch_rows)
    with open_source(layout.path) as handle:
        if layout.has_header:
            names = _header(layout, handle)
        else:
            names = list(layout.columns)
            _skip_bom(handle)
        first_row = 1
        for block in iter_blocks(handle, size):  # one reused buffer: nothing may keep a block
            parsed = parse_delimited(
                block,
                first_row,
                names,
                delimiter=layout.delimiter,
                quoted=layout.quoted,
                source_file=layout.path.name,
            )
            first_row += parsed.lines
            table = parsed.table.combine_chunks()  # a no-op unless a huge chunk parsed in pieces
            yield RawBatch(layout, table, parsed.rows, parsed.rejected, _joined(table, layout))


def _joined(table: pa.Table, layout: FileLayout) -> Callable[[np.ndarray], list[str]]:
    def raw(idx: np.ndarray) -> list[str]:
        picked = [pc.take(col, pa.array(idx, pa.int64())) for col in table.columns]
        joined = pc.binary_join_element_wise(*picked, layout.delimiter.encode(), null_handling="replace")
        return [v.decode("utf-8", "replace") for v in joined.to_pylist()]

    return raw


def _parquet_batches(layout: FileLayout, batch_rows: int) -> Iterator[RawBatch]:
    columns = layout.read_columns
    first_row = 1
    for batch in pq.ParquetFile(layout.path).iter_batches(batch_size=batch_rows, columns=columns):
        table = pa.Table.from_batches([batch])
        rows = np.arange(first_row, first_row + batch.num_rows, dtype=np.int64)
        first_row += batch.num_rows
        yield RawBatch(layout, table, rows, empty_quarantine(), _as_json(table))


def _as_json(table: pa.Table) -> Callable[[np.ndarray], list[str]]:
    def raw(idx: np.ndarray) -> list[str]:
        picked = table.take(pa.array(idx, pa.int64())).to_pylist()
        return [json.dumps(r, ensure_ascii=False, default=str) for r in picked]

    return raw


def _jsonl_batches(layout: FileLayout, batch_rows: int) -> Iterator[RawBatch]:
    columns = layout.read_columns
    first_row = 1
    with open_source(layout.path) as handle:
        _skip_bom(handle)
        for chunk in iter_chunks(handle, chunk_bytes(layout, batch_rows)):
            yield _jsonl_chunk(layout, chunk, first_row, columns)
            first_row += count_lines(chunk)


def _jsonl_chunk(layout: FileLayout, chunk: Chunk, first_row: int, columns: list[str]) -> RawBatch:
    starts, ends, _ = line_spans(np.frombuffer(chunk, np.uint8))
    filled = np.flatnonzero(ends > starts)

    def raw_of(lines: np.ndarray) -> Callable[[np.ndarray], list[str]]:
        return lambda idx: [chunk[starts[i] : ends[i]].decode("utf-8", "replace") for i in lines[idx]]

    table = _arrow_json(chunk, columns, len(filled))
    if table is not None:
        blank = np.flatnonzero(ends == starts)
        rejected = quarantine_table(
            layout.path.name,
            blank + first_row,
            Reason.EMPTY_ROW.value,
            ["empty line"] * len(blank),
            [""] * len(blank),
        )
        return RawBatch(layout, table, filled + first_row, rejected, raw_of(filled))
    table, kept, rejected = _python_json(layout, chunk, starts, ends, first_row, columns)
    return RawBatch(layout, table, kept + first_row, rejected, raw_of(kept))


def _arrow_json(chunk: Chunk, columns: list[str], expected_rows: int) -> pa.Table | None:
    """pyarrow's parse of a JSON Lines chunk, or None unless every non-blank line became one row with
    scalar values in the mapped columns (then the chunk is parsed line by line instead)."""
    try:
        options = pjson.ReadOptions(block_size=max(1 << 20, len(chunk) // 2 + 1))
        table = pjson.read_json(pa.BufferReader(chunk), read_options=options)
    except pa.ArrowInvalid:
        return None
    if table.num_rows != expected_rows:
        return None
    out = {}
    for name in columns:
        if name not in table.column_names:
            out[name] = pa.nulls(table.num_rows, pa.string())
        elif pa.types.is_nested(table.schema.field(name).type):
            return None
        else:
            out[name] = table[name].combine_chunks()
    return pa.table(out) if out else None


def _python_json(
    layout: FileLayout, chunk: Chunk, starts: np.ndarray, ends: np.ndarray, first_row: int, columns: list[str]
) -> tuple[pa.Table, np.ndarray, pa.Table]:
    values: dict[str, list[str | None]] = {c: [] for c in columns}
    kept: list[int] = []
    bad_rows: list[int] = []
    reasons: list[str] = []
    details: list[str] = []
    for i in range(len(starts)):
        reason, detail, obj = _json_line(chunk[starts[i] : ends[i]], columns)
        if reason is not None:
            bad_rows.append(i)
            reasons.append(reason.value)
            details.append(detail)
            continue
        kept.append(i)
        for c in columns:
            values[c].append(_scalar_text(obj.get(c)))
    raws = [chunk[starts[i] : ends[i]].decode("utf-8", "replace") for i in bad_rows]
    rejected = quarantine_table(
        layout.path.name,
        np.array(bad_rows, np.int64) + first_row,
        pa.array(reasons, pa.string()),
        details,
        raws,
    )
    table = pa.table({c: pa.array(v, pa.string()) for c, v in values.items()})
    return table, np.array(kept, np.int64), rejected


def _json_line(line: Chunk, columns: list[str]) -> tuple[Reason | None, str, dict[str, Any]]:
    if not line.strip():
        return Reason.EMPTY_ROW, "empty line", {}
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return Reason.BAD_ENCODING, "line is not valid UTF-8", {}
    except ValueError as err:
        return Reason.UNPARSEABLE, f"not JSON: {err}", {}
    if not isinstance(obj, dict):
        return Reason.UNPARSEABLE, f"not a JSON object but {type(obj).__name__}", {}
    for c in columns:
        if isinstance(obj.get(c), dict | list):
            return Reason.UNPARSEABLE, f"{c} is not a single value", {}
    return None, "", obj


def _scalar_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)
