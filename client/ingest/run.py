"""`ingest`: read an export, validate it, and write the normalised local store.

Two passes with bounded memory. Pass 1 streams the source in batches (read and parse one batch ahead
on a worker thread), validates each batch, sends rejects to the quarantine and spills good rows to
Arrow files partitioned by customer hash; the number of partitions is chosen from the estimated row
count so that each holds about `2 * batch_rows` rows (rounded up to a multiple of the pass-2 workers).
Pass 2 takes one partition at a time (two in parallel, largest first), removes exact duplicates,
computes sessions and writes one store part. The source is only ever opened for reading.

Memory: about three batches in pass 1 and two partitions in pass 2, whatever the file size (a single
customer with more events than a partition is the exception: its events must meet in one place).
Disk: the spill needs about 45 bytes per good row of a Taobao-like file (only the columns the source
can fill, the behaviour as a one-byte code) in `out_dir` until pass 2 has written its part.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from client.ingest.formats import FileLayout, Plan, make_plan
from client.ingest.readers import estimate_rows, iter_batches, prefetched
from client.ingest.schema import SPILL_SCHEMA, IngestError, Reason
from client.ingest.sessions import PartResult, process_partition
from client.ingest.store import (
    QUARANTINE_FILE,
    REPORT_FILE,
    STORE_DIR,
    QuarantineWriter,
    Spill,
    publish,
    write_part,
)
from client.ingest.validate import check_batch
from shared.fileio import atomic_write_json
from shared.progress import Progress

log = logging.getLogger(__name__)
PARTITION_BATCHES = 2
"""Rows per customer partition, in batches: bounds the memory of pass 2."""
MAX_PARTITIONS = 512
"""Each partition holds an open spill file during pass 1: stay well below the usual limit of 1024 open
files. Beyond 512 * 2 * batch_rows rows, partitions grow instead (raise batch_rows for such files)."""


@dataclass
class IngestReport:
    """What an ingest did; also written to `<out_dir>/ingest-report.json`."""

    source: str
    format: str
    out_dir: str
    total: int = 0
    good: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # event names that no role rule maps: kept with role `other` (rows per name, most frequent first)
    unmapped_events: dict[str, int] = field(default_factory=dict)
    roles: dict[str, int] = field(default_factory=dict)  # good rows per funnel role
    attributes: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # source file name -> rows read
    customers: int = 0
    sessions: int = 0
    session_mode: str = ""
    partitions: int = 0
    store_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def store_dir(self) -> Path:
        """Folder of the store parts."""
        return Path(self.out_dir) / STORE_DIR

    @property
    def quarantine_path(self) -> Path:
        """The quarantine file."""
        return Path(self.out_dir) / QUARANTINE_FILE

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        data = asdict(self)
        data["rows_per_second"] = round(self.total / self.seconds) if self.seconds else None
        return data


def _workers(parts: int) -> int:
    """Partitions processed at once in pass 2 (each worker holds one partition in memory)."""
    return max(1, min(2, os.cpu_count() or 1, parts))


def _partitions(plan: Plan, batch_rows: int) -> int:
    rows = sum(estimate_rows(f) for f in plan.files)
    parts = min(MAX_PARTITIONS, max(1, math.ceil(rows / (PARTITION_BATCHES * batch_rows))))
    if parts > 1:  # a multiple of the workers: no partition left to finish alone at the end
        parts = min(MAX_PARTITIONS, math.ceil(parts / _workers(parts)) * _workers(parts))
    return parts


_FORMAT_REASONS = {
    r.value
    for r in (
        Reason.UNPARSEABLE,
        Reason.BAD_ENCODING,
        Reason.MISSING_CUSTOMER_ID,
        Reason.MISSING_SESSION_ID,
        Reason.BAD_TIMESTAMP,
        Reason.TIMESTAMP_OUT_OF_RANGE,
        Reason.UNKNOWN_BEHAVIOR,
        Reason.BAD_PRICE,
    )
}
"""Reasons that, for every row of a first batch, point at the wrong format or mapping rather than at
bad data (a first batch of negative prices or blank lines is quarantined, not refused)."""


def _looks_wrong(quarantine: pa.Table) -> bool:
    return set(quarantine["reason"].to_pylist()) <= _FORMAT_REASONS


def _wrong_format(plan: Plan, layout: FileLayout, quarantine: pa.Table) -> IngestError:
    """Explain a first batch without a single good row: most likely the wrong format or mapping."""
    reasons = quarantine["reason"].to_pylist()
    top = max(set(reasons), key=reasons.count)
    example = quarantine.filter(pc.equal(quarantine["reason"], top)).slice(0, 1).to_pylist()[0]
    expected = layout.delimiter.join(layout.columns)
    return IngestError(
        f"{layout.path.name}: none of the first {len(reasons)} rows is valid {plan.fmt} data (expected "
        f"columns {expected!r}); check the format and the mapping. Most rows fail with {top}: "
        f"{example['detail']}; e.g. row {example['source_row']}: {example['raw']!r}"
    )


def _pass_one(
    plan: Plan, spill: Spill, quarantine: QuarantineWriter, report: IngestReport, batch_rows: int
) -> None:
    """Read, validate, spill. Three stages overlap: the next batch is parsed on one worker thread and
    the previous batch's good rows are spilled on another while this thread validates."""
    rows_expected = sum(estimate_rows(f) for f in plan.files)  # text files: estimated from a sample
    with (
        ThreadPoolExecutor(1, thread_name_prefix="ingest-spill") as spiller,
        Progress("ingest: reading", total=rows_expected, unit="rows", logger=log) as bar,
    ):
        pending: Future[None] | None = None
        for index, layout in enumerate(plan.files):
            name = layout.path.name
            report.files[name] = 0
            for number, batch in enumerate(prefetched(iter_batches(layout, batch_rows))):
                checked = check_batch(batch, plan, index, spill.schema)
                rows = batch.table.num_rows + batch.rejected.num_rows
                if number == 0 and rows and not checked.good.num_rows and _looks_wrong(checked.quarantine):
                    raise _wrong_format(plan, layout, checked.quarantine)
                if pending is not None:
                    pending.result()  # one batch in flight: memory stays bounded
                pending = spiller.submit(spill.add, checked.good)
                quarantine.add(checked.quarantine)
                report.files[name] += rows
                report.total += rows
                bar.update(rows)
        if pending is not None:
            pending.result()
    spill.close()


def _pass_two(
    plan: Plan,
    spill: Spill,
    tmp: Path,
    report: IngestReport,
    quarantine: QuarantineWriter,
    gap_s: int,
) -> None:
    """Deduplicate, sessionise and write each partition; at most `workers` partitions in memory."""
    names = [f.path.name for f in plan.files]
    # largest first: the last partitions to finish are small ones, so the workers end together
    parts = sorted((p for p in range(spill.parts) if spill.rows[p]), key=lambda p: -spill.rows[p]) or [0]
    store = tmp / STORE_DIR
    store.mkdir()

    def work(number: int, part: int) -> PartResult:
        result = process_partition(spill.read(part), gap_s * 1000, plan.source_sessions, names)
        write_part(result.table, store / f"part-{number:05d}.parquet")
        spill.path(part).unlink(missing_ok=True)  # frees the disk as soon as a part is written
        result.table = result.table.schema.empty_table()  # written: let the rows go
        return result

    workers = _workers(len(parts))
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="ingest-part") as pool,
        Progress("ingest: sessions", total=len(parts), unit="partitions", logger=log) as bar,
    ):
        # Results are collected in submission order (a deterministic quarantine), with a few more
        # submitted than there are workers so that none waits for the oldest to finish; a queued or
        # finished partition holds no rows (only its duplicates, until collected).
        running: deque[Future[PartResult]] = deque()
        for number, part in enumerate(parts):
            running.append(pool.submit(work, number, part))
            if len(running) >= 2 * workers:
                _collect(running.popleft().result(), report, quarantine)
                bar.update()
        while running:
            _collect(running.popleft().result(), report, quarantine)
            bar.update()
    report.store_files = [f"{STORE_DIR}/part-{n:05d}.parquet" for n in range(len(parts))]


def _collect(result: PartResult, report: IngestReport, quarantine: QuarantineWriter) -> None:
    quarantine.add(result.duplicates)
    for role, count in result.roles.items():
        report.roles[role] = report.roles.get(role, 0) + count
    for event, count in result.other_events.items():
        report.unmapped_events[event] = report.unmapped_events.get(event, 0) + count
    report.good += result.rows
    report.sessions += result.sessions
    report.customers += result.customers


def ingest(
    source: Path,
    fmt: str,
    out_dir: Path,
    *,
    mapping: dict[str, str] | None = None,
    behavior_map: dict[str, str] | None = None,
    session_gap_s: int = 1800,
    batch_rows: int = 1_000_000,
    attributes: tuple[str, ...] = (),
    strict: bool | None = None,
    replace_smaller: bool = False,
) -> IngestReport:
    """Ingest `source` (format `fmt`) into `out_dir`: store parts, quarantine file and report.

    `attributes`: source columns whose values go into the text; `strict`: quarantine event names that
    `behavior_map` does not map instead of keeping them with role `other` (default: strict only for
    the fixed public formats). Raises IngestError (a ValueError) for a wrong format or mapping, a
    source without data rows (empty or header-only), or one with fewer good rows than the store it
    would replace (unless `replace_smaller`): the old store is then left as it was. FileNotFoundError
    for a missing source. The source file is never modified."""
    started = time.perf_counter()
    if batch_rows < 1 or session_gap_s < 0:
        raise ValueError("batch_rows must be >= 1 and session_gap_s >= 0")
    source, out_dir = Path(source), Path(out_dir)
    plan = make_plan(source, fmt, mapping, behavior_map, attributes=tuple(attributes), strict=strict)
    _check_out_dir(plan, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ingest-tmp-", dir=out_dir))
    report = IngestReport(str(source), plan.fmt, str(out_dir), attributes=list(attributes))
    report.session_mode = "source" if plan.source_sessions else f"gap>{session_gap_s}s"
    try:
        filled = plan.filled_fields() | ({"file_index"} if len(plan.files) > 1 else set())
        spill_schema = pa.schema([f for f in SPILL_SCHEMA if f.name in filled])
        spill = Spill(tmp, _partitions(plan, batch_rows), spill_schema)
        quarantine = QuarantineWriter(tmp / QUARANTINE_FILE)
        try:
            _pass_one(plan, spill, quarantine, report, batch_rows)
            _pass_two(plan, spill, tmp, report, quarantine, session_gap_s)
        finally:
            spill.close()
            quarantine.close()
        _finish(report, quarantine, spill.parts, started)
        _check_replacement(source, out_dir, report, replace_smaller)
        atomic_write_json(tmp / REPORT_FILE, report.to_json())
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "ingested %s: %d rows, %d good, %d quarantined", source, report.total, report.good, report.quarantined
    )
    return report


def _check_replacement(source: Path, out_dir: Path, report: IngestReport, replace_smaller: bool) -> None:
    """Refuse an ingest that would lose data: a source without data rows, or fewer good rows than
    the store it replaces (a truncated export, the wrong file) unless asked to."""
    if report.total == 0:
        raise IngestError(
            f"{source} has no data rows (an empty or header-only file); nothing was written"
            + (f" and the store in {out_dir} is unchanged" if (out_dir / STORE_DIR).exists() else "")
        )
    old_report = out_dir / REPORT_FILE
    if replace_smaller or not (out_dir / STORE_DIR).exists() or not old_report.exists():
        return
    try:
        old_good = int(json.loads(old_report.read_text(encoding="utf-8")).get("good", 0))
    except (ValueError, TypeError, AttributeError):
        return  # an unreadable old report says nothing about the old store's size
    if report.good < old_good:
        raise IngestError(
            f"{source} gives {report.good} good rows, fewer than the {old_good} of the store in {out_dir}; "
            "the store is unchanged. If the smaller export is right, ingest it again with --replace-smaller"
        )


def _check_out_dir(plan: Plan, out_dir: Path) -> None:
    """The source may sit in `out_dir`, but must not be one of the files an ingest replaces."""
    outputs = [(out_dir / name).resolve() for name in (STORE_DIR, QUARANTINE_FILE, REPORT_FILE)]
    for layout in plan.files:
        src = layout.path.resolve()
        if any(src == o or o in src.parents for o in outputs):
            raise IngestError(f"the source {layout.path} would be overwritten by the ingest output; move it")


def _finish(report: IngestReport, quarantine: QuarantineWriter, parts: int, started: float) -> None:
    report.quarantined = quarantine.count
    report.unmapped_events = dict(sorted(report.unmapped_events.items(), key=lambda kv: (-kv[1], kv[0])))
    order = [r.value for r in Reason]
    report.reasons = dict(sorted(quarantine.reasons.items(), key=lambda kv: order.index(kv[0])))
    report.examples = {k: quarantine.examples[k] for k in report.reasons}
    report.partitions = parts
    report.seconds = round(time.perf_counter() - started, 3)
    if report.good + report.quarantined != report.total:  # a bug, never a data problem: fail loudly
        raise RuntimeError(
            f"ingest lost rows: {report.good} good + {report.quarantined} quarantined != {report.total}"
        )
