"""Vectorised validation of one batch: the good rows in store layout, and the rest for the quarantine.

Each check yields a mask over the batch; a row that fails several gets the reason that comes first in
`Reason` (so "missing customer id" wins over "bad timestamp"). Every row of the batch ends up in
exactly one of the two outputs, which is what keeps good + quarantined = total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from client.ingest.convert import MS_TYPE, as_epoch_ms, as_price, as_text, to_numpy_bool
from client.ingest.formats import FileLayout, Plan
from client.ingest.readers import RawBatch
from client.ingest.schema import (
    ATTRIBUTE_SEPARATOR,
    MAX_TIMESTAMP,
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP,
    MIN_TIMESTAMP_MS,
    SPILL_SCHEMA,
    TEXT_FIELDS,
    Reason,
    quarantine_table,
)

_UNIT_NAMES = {"s": "Unix seconds", "ms": "Unix milliseconds", "iso": "an ISO 8601 time"}


@dataclass
class Checked:
    """A validated batch: good rows (spill layout) and quarantined rows (quarantine layout)."""

    good: pa.Table
    quarantine: pa.Table


@dataclass
class _Flag:
    reason: Reason
    field: str
    mask: np.ndarray
    note: str
    show_value: bool = True  # whether the detail shows the offending value


def _is_null(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.zeros(len(arr), bool)
    return to_numpy_bool(pc.is_null(arr))


def _raw(batch: RawBatch, field: str) -> pa.Array:
    layout = batch.layout
    if field in layout.constants:
        return pa.repeat(pa.scalar(layout.constants[field], pa.string()), batch.table.num_rows)
    column = batch.table[layout.fields[field]]
    if isinstance(column, pa.ChunkedArray):  # combine_chunks would copy even a single chunk
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def _texts(batch: RawBatch, plan: Plan, flags: list[_Flag]) -> dict[str, pa.Array]:
    """Text fields as strings (empty, and the format's "missing" tokens, as null)."""
    layout, texts = batch.layout, {}
    for field in TEXT_FIELDS:
        if field in layout.fields or field in layout.constants:
            text, bad = as_text(_raw(batch, field))
            flags.append(_Flag(Reason.BAD_ENCODING, field, bad, "is not valid UTF-8", show_value=False))
            tokens = plan.null_tokens.get(field)
            if tokens:
                text = pc.if_else(
                    pc.is_in(text, value_set=pa.array(tokens)), pa.scalar(None, pa.string()), text
                )
            texts[field] = text
    if plan.categories is not None and "item_id" in texts and "category" not in layout.fields:
        keys, values = plan.categories
        texts["category"] = pc.take(values, pc.index_in(texts["item_id"], value_set=keys))
    if layout.attributes:
        texts["attributes"] = _attributes(batch, flags)
    return texts


def _attributes(batch: RawBatch, flags: list[_Flag]) -> pa.Array:
    """The attribute columns as `name=value` pairs joined by " | " (missing values left out; none at
    all: null). The names stay so that a simulation can split merchants by one attribute."""
    parts = []
    for column in batch.layout.attributes:
        if column in batch.table.column_names:
            raw = batch.table[column]
            raw = raw.combine_chunks() if isinstance(raw, pa.ChunkedArray) else raw
            text, bad = as_text(raw)
            flags.append(_Flag(Reason.BAD_ENCODING, column, bad, "is not valid UTF-8", show_value=False))
            parts.append(pc.binary_join_element_wise(f"{column}=", text, ""))  # null stays null
    if not parts:
        return pa.nulls(batch.table.num_rows, pa.string())
    joined = pc.binary_join_element_wise(*parts, ATTRIBUTE_SEPARATOR, null_handling="skip")
    return pc.if_else(pc.equal(pc.binary_length(joined), 0), pa.scalar(None, pa.string()), joined)


def _empty_rows(batch: RawBatch, texts: dict[str, pa.Array]) -> np.ndarray:
    layout = batch.layout
    empty = np.ones(batch.table.num_rows, bool)
    for field in layout.fields:
        values = texts.get(field) if field in texts else _raw(batch, field)
        empty &= _is_null(values)
    return empty


def _time_flags(batch: RawBatch, plan: Plan, flags: list[_Flag]) -> np.ndarray:
    ms, bad = as_epoch_ms(_raw(batch, "timestamp"), plan.timestamp_unit)
    unit = _UNIT_NAMES.get(plan.timestamp_unit, "a time (Unix epoch or ISO 8601)")
    flags.append(_Flag(Reason.BAD_TIMESTAMP, "timestamp", bad, f"is not {unit}"))
    out = ~bad & ((ms < MIN_TIMESTAMP_MS) | (ms >= MAX_TIMESTAMP_MS))
    span = f"is outside {MIN_TIMESTAMP:%Y-%m-%d}..{MAX_TIMESTAMP:%Y-%m-%d}"
    flags.append(_Flag(Reason.TIMESTAMP_OUT_OF_RANGE, "timestamp", out, span))
    return ms


def _price(batch: RawBatch, plan: Plan, flags: list[_Flag]) -> pa.Array | None:
    if "price" not in batch.layout.fields:
        return None
    raw = _raw(batch, "price")
    tokens = plan.null_tokens.get("price")
    if tokens and not pa.types.is_integer(raw.type) and not pa.types.is_floating(raw.type):
        text, _ = as_text(raw)
        raw = pc.if_else(pc.is_in(text, value_set=pa.array(tokens)), pa.scalar(None, pa.string()), text)
    price, bad = as_price(raw)
    flags.append(_Flag(Reason.BAD_PRICE, "price", bad, "is not a number"))
    negative = to_numpy_bool(pc.less(price, 0.0)) & ~bad
    flags.append(_Flag(Reason.NEGATIVE_PRICE, "price", negative, "is negative"))
    return price


def _rating(batch: RawBatch, flags: list[_Flag]) -> pa.Array | None:
    """A review's rating: a whole number from 1 to 5 (null stays null)."""
    if "rating" not in batch.layout.fields:
        return None
    number, bad = as_price(_raw(batch, "rating"))
    values = np.asarray(pc.fill_null(number, 1.0).to_numpy(zero_copy_only=False), dtype=np.float64)
    bad |= (values != np.round(values)) | (values < 1) | (values > 5)
    flags.append(_Flag(Reason.BAD_RATING, "rating", bad, "is not a whole number from 1 to 5"))
    valid = to_numpy_bool(pc.is_valid(number)) & ~bad
    return pa.array(np.where(valid, values, 0).astype(np.int8), pa.int8(), mask=~valid)


def _review_flags(
    behavior: pa.DictionaryArray, texts: dict[str, pa.Array], rating: pa.Array | None, flags: list[_Flag]
) -> None:
    """A review that says nothing (neither rating nor text) is not an event (as `Event` has it)."""
    review = to_numpy_bool(pc.equal(behavior.dictionary_decode(), "review"))
    if not review.any():
        return
    empty = review.copy()
    if rating is not None:
        empty &= _is_null(rating)
    if "review_text" in texts:
        empty &= _is_null(texts["review_text"])
    flags.append(_Flag(Reason.EMPTY_REVIEW, "behavior", empty, "is a review with neither rating nor text"))


def _behavior_flags(texts: dict[str, pa.Array], plan: Plan, flags: list[_Flag]) -> pa.DictionaryArray:
    """Roles of the batch (unmapped names: role `other`, or quarantined when strict). Item ids and
    query texts are optional: a page without an item and a search without its query are events."""
    behavior = plan.behaviors.encode(texts["behavior"])
    empty = _is_null(texts["behavior"])
    flags.append(_Flag(Reason.UNKNOWN_BEHAVIOR, "behavior", empty, "is empty", show_value=False))
    if plan.behaviors.strict:
        unknown = _is_null(behavior) & ~empty
        flags.append(_Flag(Reason.UNKNOWN_BEHAVIOR, "behavior", unknown, "is not in the behaviour map"))
    return behavior


def check_batch(batch: RawBatch, plan: Plan, file_index: int, schema: pa.Schema = SPILL_SCHEMA) -> Checked:
    """Validate and normalise one batch; the good rows come in `schema` (a subset of SPILL_SCHEMA:
    fields no row of the source can fill are left out rather than built as nulls)."""
    n = batch.table.num_rows
    flags: list[_Flag] = []
    texts = _texts(batch, plan, flags)
    flags.append(_Flag(Reason.EMPTY_ROW, "row", _empty_rows(batch, texts), "has no values", False))
    flags.append(
        _Flag(Reason.MISSING_CUSTOMER_ID, "customer_id", _is_null(texts["customer_id"]), "is empty", False)
    )
    if "session_id" in texts:
        flags.append(
            _Flag(Reason.MISSING_SESSION_ID, "session_id", _is_null(texts["session_id"]), "is empty", False)
        )
    ms = _time_flags(batch, plan, flags)
    behavior = _behavior_flags(texts, plan, flags)
    price = _price(batch, plan, flags)
    rating = _rating(batch, flags)
    _review_flags(behavior, texts, rating, flags)
    code, which = _assign(flags, n)
    columns: dict[str, pa.Array] = {
        **texts,
        "timestamp": pa.Array.from_buffers(MS_TYPE, n, [None, pa.py_buffer(np.ascontiguousarray(ms))]),
        "behavior": behavior,
        "source_row": pa.array(batch.rows, pa.int64()),
    }
    if price is not None:
        columns["price"] = price
    if rating is not None:
        columns["rating"] = rating
    if "file_index" in schema.names:
        columns["file_index"] = pa.array(np.full(n, file_index, np.int16))
    good = pa.table(
        [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema], schema=schema
    )
    if code.any():
        good = good.filter(pa.array(code == 0))
    return Checked(good, _quarantine(batch, flags, code, which))


def _assign(flags: list[_Flag], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's reason code (0: good) and the index of the flag that set it."""
    code = np.zeros(n, np.int8)
    which = np.full(n, -1, np.int16)
    for k in sorted(range(len(flags)), key=lambda k: flags[k].reason.code):
        if not flags[k].mask.any():  # the usual case: skip the allocations below
            continue
        hit = flags[k].mask & (code == 0)
        code[hit] = flags[k].reason.code
        which[hit] = k
    return code, which


def _column_name(layout: FileLayout, field: str) -> str:
    return layout.fields.get(field, field)


def _quarantine(batch: RawBatch, flags: list[_Flag], code: np.ndarray, which: np.ndarray) -> pa.Table:
    parts = [batch.rejected]
    layout = batch.layout
    for k in np.unique(which[which >= 0]):
        flag = flags[int(k)]
        idx = np.flatnonzero(which == k)
        column = _column_name(layout, flag.field)
        if flag.show_value and flag.field in layout.fields:
            shown, _ = as_text(pc.take(_raw(batch, flag.field), pa.array(idx)))
            values = pc.fill_null(shown, "<empty>")
            detail = pc.binary_join_element_wise(f"{column}='", values, f"' {flag.note}", "")
        else:
            detail = pa.repeat(pa.scalar(f"{column} {flag.note}"), len(idx))
        table = quarantine_table(layout.path.name, batch.rows[idx], flag.reason.value, detail, batch.raw(idx))
        parts.append(table)
    out = pa.concat_tables(parts)
    # each part is in row order; the reader's rejects and one flag's rows may interleave too
    return out.sort_by("source_row") if sum(1 for t in parts if t.num_rows) > 1 else out
