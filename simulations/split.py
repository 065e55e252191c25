"""Split one ingested dataset into several simulated merchants, so real data drives the simulation.

Each customer goes to exactly one merchant: by the value of a column (e.g. a region or channel
column, values assigned to merchants by a stable hash) or by a hash of the customer id. Every merchant
gets its own folder with `store/part-00000.parquet` and `merchant.json`, as a deployed merchant has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
        if by not in table.column_names:
            raise ValueError(f"cannot split by {by!r}: the store has columns {', '.join(table.column_names)}")
        if by != "customer_id":  # a customer follows its first row's value, so it never spans merchants
            first = table.group_by("customer_id", use_threads=False).aggregate([(by, "first")])
            keys = dict(zip(first["customer_id"].to_pylist(), first[f"{by}_first"].to_pylist(), strict=True))
            column = pa.array([keys[c] for c in table["customer_id"].to_pylist()], type=table[by].type)
        else:
            column = table[by]
        buckets = _bucket(column, merchants)
        for m in range(merchants):
            tables[m].append(table.filter(pa.array(buckets == m)))
    folders = []
    for m in range(merchants):
        folder = out_root / f"merchant-{m}"
        (folder / "store").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(tables[m]), folder / "store" / "part-00000.parquet")
        atomic_write_json(
            folder / "merchant.json",
            {"merchant_id": f"merchant-{m}", "max_epsilon": max_epsilon, "delta": delta},
        )
        folders.append(folder)
    return folders
