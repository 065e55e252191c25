"""Benchmark of `client.ingest` on a synthetic Taobao UserBehavior file.

    .venv/bin/python -m simulations.bench_ingest [--rows 10000000] [--dir DIR] [--keep]

Generates the file (shaped like the real one: ~100 events per user, in sessions of ~10 events a minute
or so apart, rows grouped by user but not in time order within a user), then measures, in the same run
and on the same file: the end-to-end ingest (CSV to sessionised Parquet store), and a bare
`pyarrow.csv.read_csv` with default options and with every column read as a string. Prints rows/s
and the ratio of ingest to bare read.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from client.ingest import ingest

START = 1511539200  # 2017-11-25, the start of the real dataset's nine days
SPAN_S = 9 * 24 * 3600
EVENTS_PER_USER = 100
EVENTS_PER_SESSION = 10
BEHAVIORS = np.array(["pv", "cart", "fav", "buy"])
BEHAVIOR_P = [0.895, 0.055, 0.03, 0.02]
CHUNK_ROWS = 1_000_000
COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]


def _chunk(rng: np.random.Generator, rows: int, first_user: int) -> pa.Table:
    """`rows` events of `rows // EVENTS_PER_USER` users numbered from `first_user`."""
    users = max(1, rows // EVENTS_PER_USER)
    lengths = rng.geometric(1 / EVENTS_PER_SESSION, size=2 * (rows // EVENTS_PER_SESSION) + 16)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), rows) + 1]
    lengths[-1] -= lengths.sum() - rows  # exactly `rows` events
    session = np.repeat(np.arange(len(lengths)), lengths)
    user = rng.integers(0, users, size=len(lengths))[session] + first_user
    start = rng.integers(START, START + SPAN_S, size=len(lengths))
    gaps = rng.exponential(60.0, size=rows).astype(np.int64)
    offset = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[np.cumsum(lengths) - lengths], lengths)
    timestamp = start[session] + offset
    order = np.lexsort((rng.random(rows), user))  # grouped by user, shuffled in time
    item = rng.integers(1, 5_000_000, size=rows)
    behavior = BEHAVIORS[rng.choice(len(BEHAVIORS), size=rows, p=BEHAVIOR_P)]
    columns = [user, item, item % 9_439 + 1, behavior, timestamp]
    return pa.table([pa.array(c[order]) for c in columns], names=COLUMNS)


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Write a Taobao-format CSV (no header) of `rows` rows."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([(c, pa.string() if c == "behavior_type" else pa.int64()) for c in COLUMNS])
    options = pcsv.WriteOptions(include_header=False, quoting_style="none")
    with pcsv.CSVWriter(str(path), schema, write_options=options) as writer:
        for first in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - first)
            writer.write_table(_chunk(rng, n, first // EVENTS_PER_USER + 1).cast(schema))


def _timed(fn: object) -> float:
    started = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - started


def bench(path: Path, out_dir: Path, rows: int) -> dict[str, float]:
    """Seconds of: ingest end to end, and bare pyarrow reads of the same file."""
    read = pcsv.ReadOptions(column_names=COLUMNS)
    as_strings = pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS})
    results = {"bare_default": _timed(lambda: pcsv.read_csv(path, read_options=read))}
    results["bare_strings"] = _timed(
        lambda: pcsv.read_csv(path, read_options=read, convert_options=as_strings)
    )
    report = None

    def run() -> None:
        nonlocal report
        report = ingest(path, "taobao", out_dir)

    results["ingest"] = _timed(run)
    assert report is not None and report.total == rows, "ingest did not read every row"
    results["sessions"] = report.sessions
    return results


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 24), b""))


def _print(rows: int, seconds: dict[str, float]) -> None:
    labels = {
        "bare_default": "bare pyarrow.csv.read_csv (defaults)",
        "bare_strings": "bare pyarrow.csv.read_csv (all as strings)",
        "ingest": "ingest end to end (CSV -> Parquet store)",
    }
    rate = {k: rows / seconds[k] for k in labels}
    for key, label in labels.items():
        print(f"{label:<44}: {seconds[key]:6.2f} s  {rate[key] / 1e6:5.2f} M rows/s")
    print(f"{'ratio ingest / bare read (defaults)':<44}: {rate['ingest'] / rate['bare_default']:.2f}")
    print(f"{'ratio ingest / bare read (all as strings)':<44}: {rate['ingest'] / rate['bare_strings']:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Generate, ingest, compare, print."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file (reused next time)")
    args = parser.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "UserBehavior.csv"
    try:
        if not path.exists() or _count_lines(path) != args.rows:
            print(f"generating {args.rows:,} rows into {path} ...", flush=True)
            generate(path, args.rows)
        print(f"file: {path.stat().st_size / 1e6:.0f} MB, {args.rows:,} rows", flush=True)
        seconds = bench(path, folder / "out", args.rows)
        print(f"sessions: {int(seconds.pop('sessions')):,}")
        _print(args.rows, seconds)
    finally:
        shutil.rmtree(folder / "out", ignore_errors=True)
        if not args.keep:
            path.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
