"""Line-exact reading of text exports: whole-line chunks, and delimited parsing with row numbers.

Every line of a text source is one row, numbered from 1 (a header line is not counted), so a quarantine
entry always points at the line to fix. pyarrow's CSV parser does the work; it cannot say where a
bad row was, so a chunk it fails on or whose row count differs from its line count (wrong field
count, stray carriage return, an unbalanced quote) is split into lines here with numpy, the broken
lines are set aside with their number, and the rest is parsed again. Clean chunks never take that
path. A quoted field may hold the delimiter but not a line break: such a row is quarantined.

Delimited files are read in `Block`s: whole lines at the start of one buffer that the reader fills
again for the next block (fresh memory is costly: every new page is a page fault), counted and
searched in place, and parsed by pyarrow as one block (one chunk per column: no concatenation later).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedReader
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from client.ingest.convert import to_numpy_bool
from client.ingest.schema import Reason, empty_quarantine, quarantine_table

NL, CR = 10, 13
BOM = b"\xef\xbb\xbf"
Chunk = bytes | bytearray
"""Whole lines of a text source."""


@dataclass
class Parsed:
    """Rows of one chunk: binary columns, their source row numbers, and the rows that failed."""

    table: pa.Table
    rows: np.ndarray
    rejected: pa.Table
    lines: int = 0  # lines of the chunk: parsed rows + rejected rows


class Block:
    """Whole lines held in `data[:size]`; from `iter_blocks`, valid only until the next block is read."""

    __slots__ = ("data", "size")

    def __init__(self, data: Chunk, size: int | None = None) -> None:
        self.data = data
        self.size = len(data) if size is None else size

    def count(self, sub: bytes) -> int:
        """Occurrences of `sub` (no copy)."""
        return self.data.count(sub, 0, self.size)

    def contains(self, sub: bytes) -> bool:
        """Whether `sub` occurs (memchr speed for one byte; no copy)."""
        return self.data.find(sub, 0, self.size) >= 0

    def lines(self) -> int:
        """Lines as `iter_blocks` cuts them: newlines, plus an unterminated last line."""
        data = np.frombuffer(self.data, np.uint8, self.size)
        step = 1 << 20  # numpy compares 3x faster than bytes.count; in slices, its mask stays small
        newlines = sum(int(np.count_nonzero(data[i : i + step] == NL)) for i in range(0, self.size, step))
        return newlines + (1 if self.size and data[-1] != NL else 0)

    def buffer(self) -> pa.Buffer:
        """The lines as a pyarrow buffer (no copy)."""
        return pa.py_buffer(memoryview(self.data)[: self.size])

    def tobytes(self) -> bytes:
        """The lines as bytes (a copy: for the rare chunks that are parsed line by line)."""
        return bytes(memoryview(self.data)[: self.size])


def read_header(handle: BinaryIO) -> bytes:
    """The first line of `handle` (BOM and line end removed); the handle is left after it."""
    line = handle.readline()
    return line.removeprefix(BOM).rstrip(b"\r\n")


def iter_chunks(handle: BufferedReader, chunk_bytes: int) -> Iterator[bytearray]:
    """Whole lines from `handle` in chunks of about `chunk_bytes` (the last may lack a final newline).

    Each chunk is read straight into its own buffer: fresh memory is costly (page faults), so no
    chunk-sized copies are made on the way."""
    rest = b""
    while True:
        buf = bytearray(len(rest) + chunk_bytes)
        buf[: len(rest)] = rest
        got = handle.readinto(memoryview(buf)[len(rest) :])
        end = len(rest) + got
        if not got:
            if rest:
                yield bytearray(rest)
            return
        cut = buf.rfind(b"\n", 0, end) + 1
        if cut == 0:  # one line longer than a chunk: keep reading until it ends
            rest = bytes(buf[:end])
            continue
        rest = bytes(buf[cut:end])
        del buf[cut:]
        yield buf


def iter_blocks(handle: BufferedReader, block_bytes: int) -> Iterator[Block]:
    """Whole lines from `handle` in blocks of about `block_bytes` (the last may lack a final newline),
    all in one buffer: a block is valid only until the next one is requested.

    The buffer grows only for a line longer than it; the partial line after a block's last newline is
    moved to the front of the buffer and completed by the next read."""
    buf = bytearray(max(1, block_bytes))
    rest = 0  # bytes at the front of `buf` that belong to the next block
    while True:
        if rest == len(buf):  # one line longer than the buffer: grow it
            bigger = bytearray(2 * len(buf))
            bigger[:rest] = buf
            buf = bigger
        got = handle.readinto(memoryview(buf)[rest:])
        end = rest + got
        if not got:
            if rest:
                yield Block(buf, rest)
            return
        cut = buf.rfind(b"\n", 0, end) + 1
        if cut == 0:  # no line end yet: read on
            rest = end
            continue
        yield Block(buf, cut)
        rest = end - cut
        if rest:
            buf[:rest] = buf[cut:end]  # same length: the buffer is not resized


def count_lines(chunk: Chunk) -> int:
    """Lines in a chunk as `iter_chunks` cuts them: newlines, plus an unterminated last line."""
    return Block(chunk).lines()


def line_spans(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, end (without `\\r\\n`) and next-line start of every line of `buf`."""
    nl = np.flatnonzero(buf == NL).astype(np.int64)
    nexts, ends = nl + 1, nl
    if len(buf) and buf[-1] != NL:
        nexts, ends = np.append(nexts, len(buf)), np.append(ends, len(buf))
    if not len(nexts):
        return nexts, nexts, nexts
    starts = np.concatenate(([0], nexts[:-1])).astype(np.int64)
    has_cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == CR)
    return starts, ends - has_cr, nexts


_MAX_BLOCK = 1 << 30
"""pyarrow's block size is an int32; a larger chunk (only for absurdly long lines) parses in pieces."""


def _arrow_parse(chunk: Block, names: list[str], delimiter: str, quoted: bool) -> pa.Table | None:
    """pyarrow's parse of a chunk into binary columns, or None when some line does not fit.

    One block, on this thread: the reader already runs beside validation and spilling, and one block
    gives one chunk per column (no concatenation afterwards)."""
    try:
        return pcsv.read_csv(
            chunk.buffer(),
            read_options=pcsv.ReadOptions(
                column_names=names, block_size=min(_MAX_BLOCK, chunk.size + 1), use_threads=False
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=delimiter, quote_char='"' if quoted else False, ignore_empty_lines=False
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.binary() for name in names},
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid:  # a wrong field count, or an unbalanced quote confusing the chunker
        return None


def parse_delimited(
    chunk: Chunk | Block,
    first_row: int,
    names: list[str],
    *,
    delimiter: str,
    quoted: bool,
    source_file: str,
) -> Parsed:
    """Parse a chunk whose first line is source row `first_row`; broken lines are rejected."""
    block = chunk if isinstance(chunk, Block) else Block(chunk)
    n_lines = block.lines()
    # pyarrow also ends a row at a lone "\r", and (quoted) may join lines at an unbalanced quote; with
    # no lone "\r" it can only join, so an equal row count means rows and lines match one to one.
    lone_cr = block.contains(b"\r") and block.count(b"\r") != block.count(b"\r\n")
    table = None if lone_cr else _arrow_parse(block, names, delimiter, quoted)
    if table is not None and table.num_rows == n_lines:
        rows = np.arange(first_row, first_row + n_lines, dtype=np.int64)
        return _blank_lines_apart(Parsed(table, rows, empty_quarantine(), n_lines), block, source_file)
    parsed = _parse_line_by_line(block.tobytes(), first_row, names, delimiter, quoted, source_file)
    parsed.lines = n_lines
    return parsed


def _blank_lines_apart(parsed: Parsed, block: Block, source_file: str) -> Parsed:
    """Reject blank lines as the line-by-line path does ("empty line", no text): pyarrow reads them
    as rows of empty fields, like a line of bare delimiters, which validation rejects with that line's
    text. Only a chunk with such a row (the first column has a null: never for a clean chunk) is
    looked at, so the outcome does not depend on how the file was cut into chunks."""
    table = parsed.table
    if not table.num_columns or any(col.null_count == 0 for col in table.columns):
        return parsed
    empty = pc.is_null(table.column(0))
    for col in table.columns[1:]:
        empty = pc.and_(empty, pc.is_null(col))
    idx = np.flatnonzero(to_numpy_bool(empty))
    if not len(idx):
        return parsed
    starts, ends, _ = line_spans(np.frombuffer(block.data, np.uint8, block.size))
    blank = idx[ends[idx] == starts[idx]]
    if not len(blank):
        return parsed
    keep = np.ones(table.num_rows, bool)
    keep[blank] = False
    problems: Problems = {int(i): (Reason.EMPTY_ROW, "empty line") for i in blank}
    rejected = _rejects(block.data, starts, ends, int(parsed.rows[0]), problems, source_file)
    return Parsed(table.filter(pa.array(keep)), parsed.rows[keep], rejected, parsed.lines)


def _field_counts(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, delimiter: str) -> np.ndarray:
    positions = np.flatnonzero(buf == ord(delimiter))
    return np.searchsorted(positions, ends) - np.searchsorted(positions, starts) + 1


def _stray_cr(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Lines holding a carriage return that is not their line end (pyarrow would split them)."""
    bad = np.zeros(len(starts), bool)
    crs = np.flatnonzero(buf == CR)
    if len(crs):
        line = np.searchsorted(starts, crs, side="right") - 1
        bad[line[crs < ends[line]]] = True
    return bad


Problems = dict[int, tuple[Reason, str]]
"""Line index in the chunk -> why it cannot be parsed."""


def _structural_problems(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Problems:
    problems: Problems = {}
    for i in np.flatnonzero(_stray_cr(buf, starts, ends)):
        problems[int(i)] = (Reason.UNPARSEABLE, "carriage return inside the row")
    for i in np.flatnonzero(ends == starts):
        problems[int(i)] = (Reason.EMPTY_ROW, "empty line")
    return problems


def _parse_line_by_line(
    chunk: Chunk, first_row: int, names: list[str], delimiter: str, quoted: bool, source_file: str
) -> Parsed:
    buf = np.frombuffer(chunk, np.uint8)
    starts, ends, nexts = line_spans(buf)
    problems = _structural_problems(buf, starts, ends)
    fields: dict[int, list[str]] = {}
    if quoted:  # a quoted delimiter would fool a count of delimiters: ask the csv module, line by line
        fields = _quoted_fields(chunk, starts, ends, delimiter, len(names), problems)
    else:
        counts = _field_counts(buf, starts, ends, delimiter)
        for i in np.flatnonzero(counts != len(names)):
            problems.setdefault(
                int(i), (Reason.UNPARSEABLE, f"expected {len(names)} fields, found {counts[i]}")
            )
    keep = np.ones(len(starts), bool)
    keep[list(problems)] = False
    rows = np.flatnonzero(keep).astype(np.int64) + first_row
    if quoted:
        table = _table_from_fields([fields[int(i)] for i in np.flatnonzero(keep)], names)
    else:
        table = _reparse(chunk, buf, keep, (starts, ends, nexts), names, delimiter)
    return Parsed(table, rows, _rejects(chunk, starts, ends, first_row, problems, source_file))


def _quoted_fields(
    chunk: Chunk, starts: np.ndarray, ends: np.ndarray, delimiter: str, expected: int, problems: Problems
) -> dict[int, list[str]]:
    fields: dict[int, list[str]] = {}
    for i in range(len(starts)):
        if i in problems:
            continue
        text = chunk[starts[i] : ends[i]].decode("utf-8", "surrogateescape")
        try:
            parsed = next(csv.reader([text], delimiter=delimiter, strict=True))
        except (csv.Error, StopIteration):
            problems[i] = (Reason.UNPARSEABLE, "unbalanced quote")
            continue
        if len(parsed) != expected:
            problems[i] = (Reason.UNPARSEABLE, f"expected {expected} fields, found {len(parsed)}")
        else:
            fields[i] = parsed
    return fields


def _reparse(
    chunk: Chunk,
    buf: np.ndarray,
    keep: np.ndarray,
    spans: tuple[np.ndarray, np.ndarray, np.ndarray],
    names: list[str],
    delimiter: str,
) -> pa.Table:
    """Parse only the kept lines; they have the right field count, so pyarrow keeps them all."""
    starts, ends, nexts = spans
    clean = buf[np.repeat(keep, nexts - starts)].tobytes()
    table = _arrow_parse(Block(clean), names, delimiter, False)
    if table is not None and table.num_rows == int(keep.sum()):
        return table
    # Not expected to happen; if pyarrow ever disagrees, split in Python rather than lose row numbers.
    kept = [chunk[starts[i] : ends[i]].decode("utf-8", "surrogateescape") for i in np.flatnonzero(keep)]
    return _table_from_fields([k.split(delimiter) for k in kept], names)


def _table_from_fields(rows: list[list[str]], names: list[str]) -> pa.Table:
    columns = [
        pa.array([r[j].encode("utf-8", "surrogateescape") or None for r in rows], pa.binary())
        for j in range(len(names))
    ]
    return pa.table(columns, names=names)


def _rejects(
    chunk: Chunk, starts: np.ndarray, ends: np.ndarray, first_row: int, problems: Problems, source_file: str
) -> pa.Table:
    if not problems:
        return empty_quarantine()
    idx = np.array(sorted(problems), dtype=np.int64)
    raws = [chunk[starts[i] : ends[i]].decode("utf-8", errors="replace") for i in idx]
    reasons = pa.array([problems[int(i)][0].value for i in idx], pa.string())
    details = [problems[int(i)][1] for i in idx]
    return quarantine_table(source_file, idx + first_row, reasons, details, raws)
