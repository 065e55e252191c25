"""Benchmark of `client.ingest` on a synthetic Taobao UserBehavior file.

    .venv/bin/python -m simulations.bench_ingest [--rows 10000000] [--repeat 3] [--dir DIR] [--keep]

Generates the file (shaped like the real one: ~100 events per user, in sessions of ~10 events a minute
or so apart, rows grouped by user but not in time order within a user), then measures, in the same run
and on the same file: the end-to-end ingest (CSV to sessionised Parquet store), and a bare
`pyarrow.csv.read_csv` with default options and with every column read as a string. Prints rows/s
and the ratio of ingest to bare read.

Every figure is measured the same way for the ingest and for the bare reads, in two settings:

- fresh process: each timed run is the first call in a new Python process (as a command runs), the
  kinds alternating, best of `--repeat`. First use of memory is part of the cost, and on a small VM
  it can be a large part (seconds per GB): a bare read that materialises the whole file pays it for
  all of it, the ingest (bounded memory) for a few hundred MB;
- warm process: one process runs each kind once untimed, then `--repeat` times back to back, best of
  them: the steady throughput of each once its memory is already mapped.

Imports happen before the clock starts in both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


KINDS = ("bare_default", "bare_strings", "ingest")
LABELS = {
    "bare_default": "bare pyarrow.csv.read_csv (defaults)",
    "bare_strings": "bare pyarrow.csv.read_csv (all as strings)",
    "ingest": "ingest end to end (CSV -> Parquet store)",
}


def _runner(kind: str, path: Path, out_dir: Path, rows: int) -> Callable[[], dict[str, float]]:
    """A timed run of `kind`: its seconds (and, for the ingest, the sessions it found)."""
    read = pcsv.ReadOptions(column_names=COLUMNS)
    as_strings = pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS})

    def run() -> dict[str, float]:
        shutil.rmtree(out_dir, ignore_errors=True)
        started = time.perf_counter()
        if kind == "bare_default":
            pcsv.read_csv(path, read_options=read)
        elif kind == "bare_strings":
            pcsv.read_csv(path, read_options=read, convert_options=as_strings)
        else:
            report = ingest(path, "taobao", out_dir)
        seconds = time.perf_counter() - started
        if kind != "ingest":
            return {"seconds": seconds}
        assert report.total == rows and report.good + report.quarantined == rows, "ingest lost rows"
        return {"seconds": seconds, "sessions": report.sessions}

    return run


def _child(kind: str, path: Path, out_dir: Path, rows: int, repeat: int) -> dict[str, dict[str, float]]:
    """In this process: one timed run of `kind`, or (`warm`) for every kind in turn one untimed run
    and then `repeat` timed ones, best of them."""
    if kind != "warm":
        return {kind: _runner(kind, path, out_dir / kind, rows)()}
    best: dict[str, dict[str, float]] = {}
    for k in KINDS:
        run = _runner(k, path, out_dir / k, rows)
        run()
        for _ in range(repeat):
            result = run()
            if k not in best or result["seconds"] < best[k]["seconds"]:
                best[k] = result
    return best


def _in_fresh_process(
    kind: str, path: Path, out_dir: Path, rows: int, repeat: int = 0
) -> dict[str, dict[str, float]]:
    args = [sys.executable, "-m", "simulations.bench_ingest", "--child", kind, "--rows", str(rows)]
    args += ["--repeat", str(repeat), "--file", str(path), "--dir", str(out_dir)]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    result: dict[str, dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def bench(path: Path, out_dir: Path, rows: int, repeat: int = 3) -> dict[str, dict[str, dict[str, float]]]:
    """Best seconds of every kind in both settings (see the module doc)."""
    fresh: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for kind in KINDS:  # alternating: each kind follows the others as often
            result = _in_fresh_process(kind, path, out_dir, rows)[kind]
            if kind not in fresh or result["seconds"] < fresh[kind]["seconds"]:
                fresh[kind] = result
    warm = _in_fresh_process("warm", path, out_dir, rows, repeat)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"fresh process": fresh, "warm process": warm}


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 24), b""))


def _print(rows: int, results: dict[str, dict[str, dict[str, float]]], repeat: int) -> None:
    for setting, seconds in results.items():
        print(f"{setting}, best of {repeat}:")
        rate = {k: rows / seconds[k]["seconds"] for k in KINDS}
        for kind in KINDS:
            figures = f"{seconds[kind]['seconds']:6.2f} s  {rate[kind] / 1e6:5.2f} M rows/s"
            print(f"  {LABELS[kind]:<44}: {figures}")
        for kind, how in (("bare_default", "defaults"), ("bare_strings", "all as strings")):
            print(f"  {f'ratio ingest / bare read ({how})':<44}: {rate['ingest'] / rate[kind]:.2f}")
    sessions = {int(r["ingest"]["sessions"]) for r in results.values()}
    print(f"sessions: {', '.join(f'{s:,}' for s in sorted(sessions))}")


def main(argv: list[str] | None = None) -> int:
    """Generate, ingest, compare, print."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each kind per setting")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file (reused next time)")
    parser.add_argument("--child", choices=[*KINDS, "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # a measuring process started by `bench`: print its result as JSON
        print(json.dumps(_child(args.child, args.file, args.dir, args.rows, args.repeat)))
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "UserBehavior.csv"
    try:
        if not path.exists() or _count_lines(path) != args.rows:
            print(f"generating {args.rows:,} rows into {path} ...", flush=True)
            generate(path, args.rows)
        print(f"file: {path.stat().st_size / 1e6:.0f} MB, {args.rows:,} rows", flush=True)
        results = bench(path, folder / "out", args.rows, args.repeat)
        _print(args.rows, results, args.repeat)
    finally:
        shutil.rmtree(folder / "out", ignore_errors=True)
        if not args.keep:
            path.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
