"""Column layouts, quarantine reasons and the error type shared by the ingest modules."""

from __future__ import annotations

import pyarrow as pa

from shared.schema import MAX_TIMESTAMP, MIN_TIMESTAMP, RowReason

STORE_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("session_id", pa.string()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("behavior", pa.string()),
        ("event_name", pa.string()),
        ("item_id", pa.string()),
        ("category", pa.string()),
        ("price", pa.float64()),
        ("query", pa.string()),
        ("title", pa.string()),
        ("attributes", pa.string()),
        ("review_text", pa.string()),
        ("rating", pa.int8()),
        ("customer_segment", pa.string()),
        ("customer_region", pa.string()),
        ("customer_age_band", pa.string()),
        ("source_row", pa.int64()),
    ]
)
"""The normalised store. customer_id, session_id, timestamp, behavior and source_row are never null.
`behavior` is the funnel role (view, fav, cart, buy, search, review, other); `event_name` the shop's own
name of the event (null for the fixed public formats, whose names are the roles); `attributes` the
attribute columns kept at ingest as `name=value` pairs joined by " | "."""
ATTRIBUTE_SEPARATOR = " | "

BEHAVIOR_TYPE = pa.dictionary(pa.int8(), pa.string())
"""How validation hands on the behaviour: indices into the store behaviours (a byte per row to spill,
and written to Parquet as a dictionary as it is; the store reads it back as plain strings)."""

# The spill files of the first pass also remember which source file a row came from (YooChoose has
# two), so that a duplicate found in the second pass is quarantined under the right file name.
SPILL_SCHEMA = pa.schema(
    [pa.field(f.name, BEHAVIOR_TYPE) if f.name == "behavior" else f for f in STORE_SCHEMA]
).append(pa.field("file_index", pa.int16()))

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)

TEXT_FIELDS = (
    "customer_id",
    "session_id",
    "behavior",
    "event_name",
    "item_id",
    "category",
    "query",
    "title",
    "review_text",
    "customer_segment",
    "customer_region",
    "customer_age_band",
)
"""Store fields read as text; `timestamp`, `price` and `rating` have their own converters,
`attributes` is built from the attribute columns."""

FIELDS = (*TEXT_FIELDS, "timestamp", "price", "rating")
"""Every field a source column can be mapped to: every field of `shared.schema.Event` but
`attributes` (which `--attribute` builds from any number of columns)."""
REQUIRED_FIELDS = ("customer_id", "timestamp", "behavior")

# Plausible event times (the same bounds as `Event`'s).
MIN_TIMESTAMP_MS = int(MIN_TIMESTAMP.timestamp() * 1000)
MAX_TIMESTAMP_MS = int(MAX_TIMESTAMP.timestamp() * 1000)


Reason = RowReason
"""The quarantine reasons, shared with every other reader of the merchant's data (`shared.schema`)."""


class IngestError(ValueError):
    """The source does not match the chosen format or mapping; the message says what to change."""


def empty_quarantine() -> pa.Table:
    """A quarantine table with no rows."""
    return QUARANTINE_SCHEMA.empty_table()


def quarantine_table(
    source_file: str, rows: object, reason: str | pa.Array, detail: object, raw: object
) -> pa.Table:
    """Quarantine rows of one file; `reason` may be one value for all rows."""
    source_rows = pa.array(rows, pa.int64())
    n = len(source_rows)
    reasons = pa.repeat(pa.scalar(reason, pa.string()), n) if isinstance(reason, str) else reason
    columns = [pa.repeat(pa.scalar(source_file, pa.string()), n), source_rows, reasons, detail, raw]
    return pa.table([_strings(c) if i != 1 else c for i, c in enumerate(columns)], schema=QUARANTINE_SCHEMA)


def _strings(values: object) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    return pa.array(values, pa.string())
