"""Format specs: how each supported export maps onto the store, and checks that a source fits its spec.

- `taobao`: Taobao UserBehavior.csv, no header: user_id,item_id,category_id,behavior_type,timestamp
  (Unix seconds; behaviours pv, buy, cart, fav).
- `retailrocket`: RetailRocket events.csv with header timestamp,visitorid,event,itemid,transactionid
  (Unix milliseconds; view, addtocart, transaction). Categories optional: `mapping={"categories": paths}`
  names CSVs (comma-separated) with a header, either `itemid,categoryid` or RetailRocket's own
  item_properties layout (`timestamp,itemid,property,value`: its `categoryid` rows, latest value wins).
- `yoochoose`: RecSys 2015 yoochoose-clicks.dat (session_id,timestamp,item_id,category) and, beside it,
  yoochoose-buys.dat (session_id,timestamp,item_id,price,quantity); ISO timestamps, no header. Pass the
  clicks file or their folder. A session is the only identity there, so it is also the customer.
- `csv`, `parquet`, `jsonl` (or `generic`: by file extension): any export, with `mapping` from store
  field to source column and `behavior_map` from the shop's event names to funnel roles. The vocabulary
  is open: the shop's own event name is kept (`event_name`) and an unmapped name gets role `other`
  (counted in the report); `strict=True` quarantines unmapped names instead, which is the rule for the
  fixed public formats, whose vocabularies are closed. `attributes` names extra columns (platform,
  lifecycle, ...) whose values go into the text.

CSV and JSON Lines may be compressed (`.gz`, `.bz2`, `.zst`): they are decompressed as a stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from client.ingest.peek import peek_columns
from client.ingest.schema import FIELDS, REQUIRED_FIELDS, IngestError
from shared.schema import Behavior

FORMATS = ("taobao", "retailrocket", "yoochoose", "generic", "csv", "parquet", "jsonl")
_ALIASES = ("pv", "click", "addtocart", "add_to_cart", "transaction", "purchase", "favorite", "favourite")
_EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}
_EXTENSIONS.update({".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"})
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}


def compression_of(path: Path) -> str | None:
    """The stream compression of a text source, from its extension (None: plain)."""
    return COMPRESSIONS.get(path.suffix.lower())


def kind_of(path: Path) -> str | None:
    """csv, jsonl or parquet from the extension, looking through a compression suffix."""
    name = Path(path.stem) if compression_of(path) else path
    return _EXTENSIONS.get(name.suffix.lower())


@dataclass(frozen=True)
class FileLayout:
    """One source file: its kind, its columns and which column feeds which store field."""

    path: Path
    kind: str  # "delimited", "jsonl" or "parquet"
    fields: Mapping[str, str]  # store field -> source column
    columns: tuple[str, ...] = ()  # the columns (of a file with a header: as expected or as peeked)
    has_header: bool = False
    delimiter: str = ","
    quoted: bool = False
    constants: Mapping[str, str] = field(default_factory=dict)  # store field -> value for every row
    attributes: tuple[str, ...] = ()  # source columns whose values go into the text

    @property
    def read_columns(self) -> list[str]:
        """The source columns a reader must deliver (mapped fields, then attributes), each once."""
        return list(dict.fromkeys([*self.fields.values(), *self.attributes]))


STORE_BEHAVIORS = pa.array([b.value for b in Behavior], pa.string())
"""The dictionary of `BehaviorTable.encode`: every store behaviour, in a fixed order."""
OTHER_CODE = [b.value for b in Behavior].index(Behavior.OTHER.value)


@dataclass(frozen=True)
class BehaviorTable:
    """Source behaviour names (lower case) and the store behaviour each stands for."""

    keys: pa.Array
    values: pa.Array
    strict: bool = False  # unmapped names: quarantined (True) or role `other` (False)

    def _index(self, names: pa.Array) -> pa.Array:
        idx = pc.index_in(names, value_set=self.keys)
        if idx.null_count > names.null_count:
            folded = pc.index_in(pc.utf8_lower(pc.utf8_trim_whitespace(names)), value_set=self.keys)
            idx = pc.coalesce(idx, folded)
        return idx

    def map(self, names: pa.Array) -> pa.Array:
        """Store behaviours of `names` (null where unknown); exact match first, then case-insensitive."""
        return pc.take(self.values, self._index(names))

    def encode(self, names: pa.Array) -> pa.DictionaryArray:
        """Roles of `names` as a dictionary array over `STORE_BEHAVIORS` (type `BEHAVIOR_TYPE`: no
        strings built). Unless strict, a name no rule maps gets role `other`; an empty name stays null
        (quarantined) either way, as does an unmapped one when strict."""
        codes = pc.index_in(self.values, value_set=STORE_BEHAVIORS).cast(pa.int8())
        index = self._index(names)
        if not self.strict and index.null_count > names.null_count:
            missing = pc.and_(pc.is_null(index), pc.is_valid(names))
            index = pc.if_else(missing, pa.scalar(len(self.keys), index.type), index)
            codes = pa.concat_arrays([codes, pa.array([OTHER_CODE], pa.int8())])
        return pa.DictionaryArray.from_arrays(pc.take(codes, index), STORE_BEHAVIORS)


@dataclass(frozen=True)
class Plan:
    """Everything ingest needs to know about a source, checked before any row is read."""

    fmt: str
    files: tuple[FileLayout, ...]
    timestamp_unit: str  # s, ms, iso or auto
    behaviors: BehaviorTable
    null_tokens: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # field -> "missing" values
    categories: tuple[pa.Array, pa.Array] | None = None  # item ids, their categories

    @property
    def source_sessions(self) -> bool:
        """Whether sessions come from the source rather than from inactivity gaps."""
        return all("session_id" in f.fields for f in self.files)

    def filled_fields(self) -> set[str]:
        """Store fields that some row can have a value for."""
        filled = {"customer_id", "timestamp", "behavior", "source_row"}
        filled |= {f for layout in self.files for f in layout.fields}
        if self.categories is not None:
            filled.add("category")
        if any(layout.attributes for layout in self.files):
            filled.add("attributes")
        if not self.source_sessions:
            filled.discard("session_id")
        return filled


def behavior_table(extra: Mapping[str, str] | None, *, strict: bool = False) -> BehaviorTable:
    """The standard names and aliases, plus (overriding them) the shop's own `behavior_map`."""
    table = {b.value: b.value for b in Behavior}
    table.update({alias: Behavior.parse(alias).value for alias in _ALIASES})
    for name, target in (extra or {}).items():
        try:
            table[name.strip().lower()] = Behavior.parse(str(target)).value
        except ValueError:
            known = ", ".join(b.value for b in Behavior)
            raise IngestError(
                f"behaviour map: {name!r} -> {target!r}: {target!r} is not a funnel role ({known})"
            ) from None
    keys, values = pa.array(list(table), pa.string()), pa.array(list(table.values()), pa.string())
    return BehaviorTable(keys, values, strict)


def make_plan(
    source: Path,
    fmt: str,
    mapping: Mapping[str, str] | None,
    behavior_map: Mapping[str, str] | None,
    *,
    attributes: tuple[str, ...] = (),
    strict: bool | None = None,
) -> Plan:
    """Check `source` against format `fmt` and build the plan; raises IngestError saying what is wrong.

    `strict=None`: strict for the fixed public formats (closed vocabularies), open for the others."""
    source = Path(source)
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "yoochoose" and not source.is_file():
        raise FileNotFoundError(f"no source file at {source}")
    fixed = fmt in ("taobao", "retailrocket", "yoochoose")
    if fixed and attributes:
        raise IngestError(f"format {fmt} has fixed columns; --attribute is only for csv, parquet, jsonl")
    behaviors = behavior_table(behavior_map, strict=fixed if strict is None else strict)
    if fmt == "taobao":
        _no_mapping(fmt, mapping)
        return Plan(fmt, (_taobao(source),), "s", behaviors)
    if fmt == "retailrocket":
        return _retailrocket(source, mapping, behaviors)
    if fmt == "yoochoose":
        _no_mapping(fmt, mapping)
        return _yoochoose(source, behaviors)
    kind = kind_of(source) if fmt == "generic" else fmt
    if kind is None:
        raise IngestError(
            f"cannot tell the kind of {source.name} from its extension; use --format csv|parquet|jsonl"
        )
    if kind == "parquet" and compression_of(source):
        raise IngestError(f"{source.name}: Parquet compresses internally; decompress the file first")
    return Plan(kind, (generic_layout(source, kind, mapping, attributes),), "auto", behaviors)


def _no_mapping(fmt: str, mapping: Mapping[str, str] | None) -> None:
    if mapping:
        raise IngestError(f"format {fmt} has fixed columns; a column mapping is only for csv, parquet, jsonl")


TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
RETAILROCKET_COLUMNS = ("timestamp", "visitorid", "event", "itemid", "transactionid")
CLICKS_COLUMNS = ("session_id", "timestamp", "item_id", "category")
BUYS_COLUMNS = ("session_id", "timestamp", "item_id", "price", "quantity")


def _taobao(source: Path) -> FileLayout:
    fields = {"customer_id": "user_id", "item_id": "item_id", "category": "category_id"}
    fields.update({"behavior": "behavior_type", "timestamp": "timestamp"})
    return FileLayout(source, "delimited", fields, columns=TAOBAO_COLUMNS)


def _retailrocket(source: Path, mapping: Mapping[str, str] | None, behaviors: BehaviorTable) -> Plan:
    extra = set(mapping or {}) - {"categories"}
    if extra:
        raise IngestError(
            f"retailrocket takes only mapping key 'categories' (a CSV path), not {sorted(extra)}"
        )
    fields = {"customer_id": "visitorid", "timestamp": "timestamp", "behavior": "event", "item_id": "itemid"}
    layout = FileLayout(source, "delimited", fields, columns=RETAILROCKET_COLUMNS, has_header=True)
    categories = load_categories(mapping["categories"]) if mapping else None
    return Plan("retailrocket", (layout,), "ms", behaviors, categories=categories)


def _yoochoose(source: Path, behaviors: BehaviorTable) -> Plan:
    folder = source if source.is_dir() else source.parent
    clicks = folder / "yoochoose-clicks.dat" if source.is_dir() else source
    if not clicks.is_file():
        raise FileNotFoundError(f"no YooChoose clicks file at {clicks}")
    buys = folder / clicks.name.replace("clicks", "buys")
    session = {"customer_id": "session_id", "session_id": "session_id", "timestamp": "timestamp"}
    files = [
        FileLayout(
            clicks,
            "delimited",
            {**session, "item_id": "item_id", "category": "category"},
            columns=CLICKS_COLUMNS,
            constants={"behavior": "view"},
        )
    ]
    if buys.is_file() and buys != clicks:
        files.append(
            FileLayout(
                buys,
                "delimited",
                {**session, "item_id": "item_id", "price": "price"},
                columns=BUYS_COLUMNS,
                constants={"behavior": "buy"},
            )
        )
    # "0" marks an unknown category in the clicks and an unknown price in the buys
    return Plan(
        "yoochoose", tuple(files), "iso", behaviors, null_tokens={"category": ("0",), "price": ("0",)}
    )


def generic_layout(
    source: Path, kind: str, mapping: Mapping[str, str] | None, attributes: tuple[str, ...] = ()
) -> FileLayout:
    """Layout of a shop's own export: its columns, checked against the mapping (identity by default).
    The event name is the behaviour column unless `event_name` is mapped to a column of its own."""
    columns, first_row, delimiter = peek_columns(source, kind)
    if not columns:
        raise IngestError(f"{source.name} is empty (no header, no rows); nothing was written")
    if columns[0].lstrip().startswith(("[", "{")) and kind == "csv":
        raise IngestError(
            f"{source.name} looks like JSON, not CSV (it starts with {columns[0][:1]!r}); "
            "export it as CSV, or save JSON Lines (one object per line) and use --format jsonl"
        )
    if mapping is None:
        fields = {f: f for f in FIELDS if f in columns}
    else:
        fields = dict(mapping)
        unknown = [k for k in fields if k not in FIELDS]
        if unknown:
            raise IngestError(
                f"mapping key {unknown[0]!r} is not a store field; use one of {', '.join(FIELDS)}"
            )
    where = f"{source.name} has columns {', '.join(map(repr, columns))}; first row: {_show(first_row)}"
    for target, column in fields.items():
        # JSON Lines objects may leave out optional keys, so only the required ones must show up early
        if column not in columns and (kind != "jsonl" or target in REQUIRED_FIELDS):
            raise IngestError(f"mapping: column {column!r} (for {target}) is not in the source; {where}")
    for required in REQUIRED_FIELDS:
        if required not in fields:
            raise IngestError(
                f"no column for {required}: add it to the mapping ({required}=<column>); {where}"
            )
    fields.setdefault("event_name", fields["behavior"])
    for column in attributes:
        if column not in columns and kind != "jsonl":
            raise IngestError(f"--attribute: column {column!r} is not in the source; {where}")
    attrs = tuple(dict.fromkeys(attributes))
    if kind == "csv":
        return FileLayout(
            source, "delimited", fields, tuple(columns), True, delimiter, quoted=True, attributes=attrs
        )
    return FileLayout(source, kind, fields, tuple(columns), attributes=attrs)


def _show(row: Mapping[str, object] | None) -> str:
    return "(none)" if row is None else json.dumps(row, ensure_ascii=False, default=str)[:500]


_CATEGORY_TYPES = {n: pa.string() for n in ("itemid", "categoryid", "property", "value")}


def load_categories(paths: str) -> tuple[pa.Array, pa.Array]:
    """Item -> category from CSVs (comma-separated paths) with columns `itemid,categoryid`, or in
    RetailRocket's item_properties layout (`timestamp,itemid,property,value`; the latest value wins).

    Streams each file and keeps only category rows, so the large item_properties files are fine."""
    import pyarrow.csv as pcsv

    parts: list[pa.Table] = []
    for name in paths.split(","):
        path = Path(name.strip())
        if not path.is_file():
            raise FileNotFoundError(f"no categories file at {path}")
        reader = pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(column_types=_CATEGORY_TYPES))
        columns = set(reader.schema.names)
        properties = {"itemid", "property", "value"} <= columns
        if not properties and not {"itemid", "categoryid"} <= columns:
            raise IngestError(
                f"categories file {path.name} needs columns itemid,categoryid (or timestamp,itemid,property,"
                f"value); it has {', '.join(reader.schema.names)}"
            )
        for batch in reader:
            table = pa.Table.from_batches([batch])
            if properties:
                table = table.filter(pc.equal(table["property"], "categoryid"))
                table = table.rename_columns(
                    ["categoryid" if n == "value" else n for n in table.column_names]
                )
            order = (
                pc.multiply(table["timestamp"], -1) if "timestamp" in columns else pa.repeat(0, len(table))
            )
            parts.append(
                pa.table(
                    {
                        "order": pc.cast(order, pa.int64()),
                        "itemid": table["itemid"],
                        "categoryid": table["categoryid"],
                    }
                )
            )
    if not parts:
        return pa.array([], pa.string()), pa.array([], pa.string())
    table = pa.concat_tables(parts).sort_by("order")  # stable: the latest row of each item comes first
    latest = table.group_by("itemid", use_threads=False).aggregate([("categoryid", "first")])
    return latest["itemid"].combine_chunks(), latest["categoryid_first"].combine_chunks()
