"""Split one ingested dataset into several simulated merchants, so real data drives the simulation.

Each customer goes to exactly one merchant: by the value of a column or of an attribute kept at ingest
(e.g. a region or acquisition channel, values assigned to merchants by a stable hash) or by a hash of
the customer id. A labels file beside the store (`--labels` at ingest) is split the same way. Every merchant
gets its own folder with `store/part-00000.parquet` and `merchant.json`, as a deployed merchant has.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from client.ingest.schema import ATTRIBUTE_SEPARATOR
from shared.fileio import atomic_write_json
from shared.tasks import stable_hash


def _bucket(values: pa.ChunkedArray | pa.Array, merchants: int) -> np.ndarray:
    unique = pc.unique(values).to_pylist()
    lookup = {v: stable_hash("split-merchant", v) % merchants for v in unique}
    index = pc.index_in(values, value_set=pa.array(unique, type=values.type)).to_numpy(zero_copy_only=False)
    table = np.array([lookup[v] for v in unique], dtype=np.int64)
    return table[index]


def split_store(
    ingested: Path,
    out_root: Path,
    *,
    merchants: int,
    by: str = "customer_id",
    max_epsilon: float = 8.0,
    delta: float = 1e-6,
) -> list[Path]:
    """Write `merchants` merchant folders under `out_root` from the store in `ingested/store`."""
    if merchants < 1:
        raise ValueError(f"merchants must be ≥ 1, got {merchants}")
    parts = sorted((ingested / "store").glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(
            f"no Parquet store in {ingested / 'store'}; run fedbehavior merchant ingest first"
        )
    tables: list[list[pa.Table]] = [[] for _ in range(merchants)]
    for part in parts:
        table = pq.read_table(part)
        derived = by not in table.column_names  # an attribute: pulled out, dropped again on writing
        if derived:
            table = _with_attribute(table, by)
        if by != "customer_id":  # a customer follows its first row's value, so it never spans merchants
            first = table.group_by("customer_id", use_threads=False).aggregate([(by, "first")])
            keys = dict(zip(first["customer_id"].to_pylist(), first[f"{by}_first"].to_pylist(), strict=True))
            column = pa.array([keys[c] for c in table["customer_id"].to_pylist()], type=table[by].type)
        else:
            column = table[by]
        buckets = _bucket(column, merchants)
        for m in range(merchants):
            mine = table.filter(pa.array(buckets == m))
            tables[m].append(mine.drop_columns([by]) if derived else mine)
    folders = []
    owner: dict[str, int] = {}
    for m in range(merchants):
        for t in tables[m]:
            owner.update(dict.fromkeys(t["customer_id"].to_pylist(), m))
    for m in range(merchants):
        folder = out_root / f"merchant-{m}"
        (folder / "store").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(tables[m]), folder / "store" / "part-00000.parquet")
        atomic_write_json(
            folder / "merchant.json",
            {"merchant_id": f"merchant-{m}", "max_epsilon": max_epsilon, "delta": delta},
        )
        folders.append(folder)
    _split_labels(ingested, folders, owner)
    return folders


def _with_attribute(table: pa.Table, name: str) -> pa.Table:
    """`table` with a column holding attribute `name` (from the `attributes` pairs), or a clear error."""
    known = set(table.column_names)
    if "attributes" in known:
        sep = re.escape(ATTRIBUTE_SEPARATOR)
        pattern = rf"(?:^|{sep}){re.escape(name)}=(?P<v>.*?)(?:{sep}|$)"
        values = pc.struct_field(pc.extract_regex(table["attributes"], pattern), "v")
        if pc.count(values).as_py():
            return table.append_column(name, values)
    raise ValueError(
        f"cannot split by {name!r}: the store has columns {', '.join(table.column_names)} and no such "
        "attribute (keep it at ingest with --attribute)"
    )


def _split_labels(ingested: Path, folders: list[Path], owner: dict[str, int]) -> None:
    """Each labelled customer's rows go to its merchant; rows keyed by a session id alone go to every
    merchant (each one's own check then keeps only its sessions)."""
    source = next((ingested / n for n in ("labels.csv",) if (ingested / n).is_file()), None)
    if source is None:
        return
    with source.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        rows: list[list[dict[str, str]]] = [[] for _ in folders]
        for row in reader:
            m = owner.get((row.get("customer_id") or "").strip())
            for i in [m] if m is not None else ([] if row.get("customer_id") else range(len(folders))):
                rows[i].append(row)
    for folder, mine in zip(folders, rows, strict=True):
        with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(mine)
