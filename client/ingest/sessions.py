"""Second pass, one customer partition at a time: drop exact duplicates, then cut sessions.

The first pass routes every good row to a partition by a hash of its customer id, so all of a
customer's events meet in one partition whatever the order of the source (Taobao's is not sorted).
Each partition, bounded by construction, is ordered here by (customer, timestamp) with a stable sort,
so equal timestamps keep their source order. Rows keep their source order in the written store; only
the computed session ids depend on the sort.

Gap sessions: a customer's next event starts a new session when it comes more than `gap_ms` after the
previous one. The id is `<customer_id>:<start>` with the session's first event time in Unix ms: the same
input gives the same ids, and ids of older sessions survive appending newer events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from client.ingest.convert import to_numpy_bool
from client.ingest.formats import OTHER_CODE
from client.ingest.schema import STORE_SCHEMA, Reason, empty_quarantine, quarantine_table

_COMPARED = (
    "session_id",
    "behavior",
    "event_name",
    "item_id",
    "category",
    "price",
    "query",
    "title",
    "attributes",
    "review_text",
    "rating",
    "customer_segment",
    "customer_region",
    "customer_age_band",
)
"""Besides customer and timestamp (equal by construction), what makes two rows exact duplicates."""


@dataclass
class PartResult:
    """One partition, ready to write: store rows, duplicates removed, and its counts."""

    table: pa.Table
    duplicates: pa.Table
    sessions: int
    customers: int
    rows: int = 0  # rows of `table` (kept when the table itself is dropped after writing)
    roles: dict[str, int] = field(default_factory=dict)  # rows per funnel role
    other_events: dict[str, int] = field(default_factory=dict)  # rows per event name with role other

    def __post_init__(self) -> None:
        self.rows = self.rows or self.table.num_rows


def customer_keys(customers: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 keys equal exactly when the ids are: the number itself when every id is a canonical
    decimal (as in the public datasets; cheap), else a dictionary index."""
    if len(customers) and customers.null_count == 0 and _canonical_decimals(customers):
        return np.asarray(pc.cast(customers, pa.int64()).to_numpy())
    encoded = pc.dictionary_encode(customers)
    if isinstance(encoded, pa.ChunkedArray):  # one dictionary for all chunks
        encoded = encoded.combine_chunks()
    return np.asarray(encoded.indices.to_numpy(), dtype=np.int64)


def _canonical_decimals(customers: pa.Array | pa.ChunkedArray) -> bool:
    """Whether every id is a decimal of at most 18 digits without a leading zero (aggregates only: no
    row-sized masks leave pyarrow)."""
    if not pc.all(pc.ascii_is_decimal(customers)).as_py():
        return False
    lengths = pc.binary_length(customers)
    if pc.max(lengths).as_py() > 18:
        return False
    padded = pc.and_(pc.starts_with(customers, "0"), pc.greater(lengths, 1))
    return not pc.any(padded).as_py()


@dataclass
class Sorted:
    """A partition in (customer, time) order: the row positions, and keys and times in that order."""

    order: np.ndarray
    keys: np.ndarray
    times: np.ndarray

    def without(self, positions: np.ndarray, n: int) -> Sorted:
        """The same order with the rows at `positions` left out."""
        drop = np.zeros(n, bool)
        drop[positions] = True
        keep = ~drop[self.order]
        return Sorted(self.order[keep], self.keys[keep], self.times[keep])


def sort_order(keys: np.ndarray, times: np.ndarray) -> Sorted:
    """Stable order by (key, time)."""
    if not len(keys):
        return Sorted(np.zeros(0, np.int64), keys, times)
    k, t = keys - keys.min(), times - times.min()
    t_bits = int(t.max()).bit_length()
    if int(k.max()).bit_length() + t_bits <= 62:  # one packed int64: much faster than a two-key sort
        k <<= t_bits
        k |= t
        order = np.argsort(k, kind="stable")
    else:
        order = np.lexsort((times, keys))
    return Sorted(order, keys[order], times[order])


def _same(a: pa.Array, b: pa.Array) -> np.ndarray:
    equal = to_numpy_bool(pc.equal(a, b))
    return equal | (to_numpy_bool(pc.is_null(a)) & to_numpy_bool(pc.is_null(b)))


def _decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def find_duplicates(table: pa.Table, rows: Sorted) -> tuple[np.ndarray, np.ndarray]:
    """Positions of rows that repeat an earlier row exactly, and the source row each one repeats.

    Only rows sharing (customer, timestamp) with a neighbour in sorted order can be duplicates; those
    few are compared on every other column."""
    ks, ts = rows.keys, rows.times
    tie = ks[1:] == ks[:-1]
    tie &= ts[1:] == ts[:-1]
    if not tie.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    after = np.zeros(len(ks), bool)  # ties with the row before it
    after[1:] = tie
    in_tie = after.copy()
    in_tie[:-1] |= tie
    cand = np.flatnonzero(in_tie)
    group = np.cumsum(~after[cand])  # tie groups numbered over the candidates only
    positions = rows.order[cand]
    compared = [c for c in _COMPARED if c in table.column_names]
    sub = table.select([*compared, "source_row"]).take(pa.array(positions))
    sub = pa.table([_decoded(c) for c in sub.columns], names=sub.column_names)  # dictionaries do not sort
    sub = sub.append_column("_group", pa.array(group)).append_column("_pos", pa.array(positions))
    keys_ = [("_group", "ascending"), *((c, "ascending") for c in compared), ("source_row", "ascending")]
    sub = sub.sort_by(keys_).combine_chunks()
    m = sub.num_rows
    repeat = np.ones(m - 1, bool)
    for name in ("_group", *compared):
        col = sub[name]
        repeat &= _same(col.slice(1), col.slice(0, m - 1))
    dup = np.concatenate(([False], repeat))
    first = np.maximum.accumulate(np.where(dup, 0, np.arange(m)))
    return sub["_pos"].to_numpy()[dup], sub["source_row"].to_numpy()[first][dup]


def _gap_session_ids(
    customers: pa.Array | pa.ChunkedArray, rows: Sorted, gap_ms: int, n: int
) -> tuple[np.ndarray, pa.Array]:
    """Session number of every row (by position; 0 for rows not in `rows`) and the id of every session."""
    ks, ts = rows.keys, rows.times
    new = np.empty(len(ks), bool)
    new[:1] = True
    np.not_equal(ks[1:], ks[:-1], out=new[1:])
    gap = ts[1:] - ts[:-1]
    new[1:] |= gap > gap_ms
    del gap
    starts = np.flatnonzero(new)
    first = pc.take(customers, pa.array(rows.order[starts]))
    if isinstance(first, pa.ChunkedArray):
        first = first.combine_chunks()
    names = pc.binary_join_element_wise(first, pc.cast(pa.array(ts[starts]), pa.string()), ":")
    number = np.cumsum(new, dtype=np.int32)
    number -= 1
    # rows left out of `rows` (duplicates) keep session 0: they are dropped before the write
    by_position = np.zeros(n, np.int32) if len(rows.order) < n else np.empty(n, np.int32)
    by_position[rows.order] = number
    return by_position, names


def _count_customers(rows: Sorted) -> int:
    return int(np.count_nonzero(rows.keys[1:] != rows.keys[:-1])) + 1 if len(rows.keys) else 0


def process_partition(
    table: pa.Table, gap_ms: int, source_sessions: bool, file_names: Sequence[str]
) -> PartResult:
    """Deduplicate and sessionise one partition (spill layout in, store layout out)."""
    n = table.num_rows
    if not n:
        return PartResult(STORE_SCHEMA.empty_table(), empty_quarantine(), 0, 0)
    customers = table["customer_id"]  # pyarrow works on the spill's chunks as they are: no copy
    keys = customer_keys(customers)
    rows = sort_order(keys, pc.cast(table["timestamp"], pa.int64()).to_numpy())
    dup_pos, dup_of = find_duplicates(table, rows)
    duplicates = _duplicates_table(table, dup_pos, dup_of, file_names)
    if len(dup_pos):
        rows = rows.without(dup_pos, n)
    if source_sessions:
        session_ids = table["session_id"]
        # a session id may repeat across customers (s1 of every customer): count (customer, session)
        kept = pa.array(np.sort(rows.order))
        pairs = pc.binary_join_element_wise(
            pc.take(customers, kept), pc.take(session_ids, kept), "\x1f", null_handling="replace"
        )
        sessions = int(pc.count_distinct(pairs).as_py())
    else:
        by_position, names = _gap_session_ids(customers, rows, gap_ms, n)
        # a dictionary, not `names` taken row by row: the Parquet writer stores it as it is
        session_ids = pa.DictionaryArray.from_arrays(pa.array(by_position), names)
        sessions = len(names)
    out = {name: table[name] for name in table.column_names}
    out["session_id"] = session_ids
    store = pa.table(
        [out[f.name] if f.name in out else pa.nulls(n, f.type) for f in STORE_SCHEMA],
        schema=pa.schema([_store_field(f, out.get(f.name)) for f in STORE_SCHEMA]),
    )
    if len(dup_pos):
        keep = np.ones(n, bool)
        keep[dup_pos] = False
        store = store.filter(pa.array(keep))
    roles, others = _role_counts(store)
    return PartResult(store, duplicates, sessions, _count_customers(rows), roles=roles, other_events=others)


def _role_counts(store: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    """Rows per role, and per event name among rows of role `other` (what the merchant may still want
    to map). Roles are counted on the dictionary codes when the column comes encoded (no strings)."""
    column = store["behavior"].combine_chunks()
    if pa.types.is_dictionary(column.type):
        names = column.dictionary.to_pylist()
        codes = np.bincount(column.indices.to_numpy(zero_copy_only=False), minlength=len(names))
        roles = {names[i]: int(c) for i, c in enumerate(codes) if c}
        other = pc.equal(column.indices, pa.scalar(OTHER_CODE, column.indices.type))
    else:
        roles = {e["values"]: e["counts"] for e in pc.value_counts(column).to_pylist()}
        other = pc.equal(column, "other")
    if not roles.get("other") or store["event_name"].null_count == store.num_rows:
        return roles, {}
    named = pc.filter(store["event_name"], other)
    return roles, {e["values"]: e["counts"] for e in pc.value_counts(named).to_pylist() if e["values"]}


def _store_field(f: pa.Field, column: pa.Array | pa.ChunkedArray | None) -> pa.Field:
    """The store field, or its dictionary-encoded form where the column comes as a dictionary of the
    same values (`write_part` writes such a column as a Parquet dictionary; it reads back as `f`)."""
    if column is not None and pa.types.is_dictionary(column.type) and column.type.value_type == f.type:
        return f.with_type(column.type)
    return f


def _duplicates_table(
    table: pa.Table, positions: np.ndarray, first: np.ndarray, file_names: Sequence[str]
) -> pa.Table:
    if not len(positions):
        return empty_quarantine()
    rows = table.take(pa.array(positions))
    shown = [
        pc.cast(rows[c], pa.string())
        for c in ("customer_id", "timestamp", "behavior", "item_id")
        if c in rows.column_names
    ]
    raw = pc.binary_join_element_wise(*shown, ",", null_handling="replace")
    files = rows["file_index"].to_numpy() if "file_index" in rows.column_names else np.zeros(len(rows), int)
    parts = []
    for index in np.unique(files):
        at = np.flatnonzero(files == index)
        detail = [f"duplicate of row {r}" for r in first[at]]
        parts.append(
            quarantine_table(
                file_names[int(index)],
                rows["source_row"].to_numpy()[at],
                Reason.DUPLICATE.value,
                detail,
                pc.take(raw, pa.array(at)),
            )
        )
    return pa.concat_tables(parts)
