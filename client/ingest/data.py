"""The merchant's local store: read and validate events, quarantine bad rows, build encoded examples.

Events are JSON Lines (`events.jsonl`, one `shared.schema.Event` per line) in the merchant's data
folder, which is only ever read. Rows that fail validation go to `quarantine.jsonl` in the merchant's
state folder with their line number and reason; good + quarantined = total, always.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from pydantic import ValidationError

from client.ingest.encoded import Encoded
from shared.candidates import build_candidates
from shared.fileio import atomic_write_bytes
from shared.schema import Event, RowReason, row_reason
from shared.tasks import (
    Candidate,
    TaskSpec,
    TaskStats,
    one_per_customer,
    split_by_time,
    split_customers,
    up_to_k_per_customer,
)
from shared.text import serialize, tokenizer_counter

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
QUARANTINE_FILE = "quarantine.jsonl"


@dataclass
class LoadReport:
    total: int = 0
    good: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _reason(err: Exception) -> tuple[RowReason, str]:
    """The shared quarantine reason (`shared.schema.RowReason`, as the ingest gives it) and a detail."""
    if isinstance(err, ValidationError):
        return row_reason(err)
    if isinstance(err, UnicodeDecodeError):
        return RowReason.BAD_ENCODING, f"is not valid UTF-8 ({err.reason} at byte {err.start})"
    return RowReason.UNPARSEABLE, f"{type(err).__name__}: {err}"


STORE_DIR = "store"


class _Quarantine:
    """Collects rejected rows with their reason; `finish` writes them and fills the report's counts."""

    def __init__(self) -> None:
        self.report = LoadReport()
        self.rows: list[str] = []

    def add(self, err: Exception, where: dict[str, object]) -> None:
        reason, detail = _reason(err)
        self.report.reasons[reason.value] = self.report.reasons.get(reason.value, 0) + 1
        record = {**where, "reason": reason.value, "detail": detail}
        self.rows.append(json.dumps(record, ensure_ascii=False, default=str))

    def finish(self, good: int, quarantine_dir: Path) -> LoadReport:
        self.report.good, self.report.quarantined = good, len(self.rows)
        # rewritten on every load, so it never lists rows of an earlier, since corrected, export
        path = quarantine_dir / QUARANTINE_FILE
        atomic_write_bytes(path, "".join(r + "\n" for r in self.rows).encode("utf-8"))
        if self.rows:
            log.warning(
                "%d of %d rows quarantined to %s: %s",
                len(self.rows),
                self.report.total,
                path,
                self.report.reasons,
            )
        return self.report


def load_events(data_dir: Path, quarantine_dir: Path) -> tuple[list[Event], LoadReport]:
    """Validated events of the merchant: the Parquet store written by `fedbehavior merchant ingest`
    (`data_dir/store/`) when there is one, else `data_dir/events.jsonl`. Bad rows are quarantined."""
    if (data_dir / STORE_DIR).is_dir():
        return _load_store(data_dir / STORE_DIR, quarantine_dir)
    path = data_dir / EVENTS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no {EVENTS_FILE} or {STORE_DIR}/ in data folder {data_dir}; point data-dir at the merchant's "
            "events, or ingest an export first (fedbehavior merchant ingest)"
        )
    events: list[Event] = []
    quarantine = _Quarantine()
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            quarantine.report.total += 1
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise TypeError(f"a line must be one JSON object, got {type(row).__name__}")
                events.append(Event.model_validate(row))
            except (ValidationError, ValueError, TypeError) as err:  # JSON and UTF-8 errors are ValueErrors
                quarantine.add(err, {"line": line_no, "row": line.rstrip("\n")})
    return events, quarantine.finish(len(events), quarantine_dir)


def _load_store(store: Path, quarantine_dir: Path) -> tuple[list[Event], LoadReport]:
    """Events of an ingested Parquet store (already validated by ingest; checked again as Events)."""
    import pyarrow.parquet as pq

    events: list[Event] = []
    quarantine = _Quarantine()
    for part in sorted(store.glob("*.parquet")):
        for row in pq.read_table(part).to_pylist():
            quarantine.report.total += 1
            fields = {k: v for k, v in row.items() if v is not None and k != "source_row"}
            try:
                events.append(Event.model_validate(fields))
            except ValidationError as err:
                quarantine.add(err, {"file": part.name, "source_row": row.get("source_row")})
    return events, quarantine.finish(len(events), quarantine_dir)


@dataclass
class MerchantData:
    """One merchant's candidates for one task, split into training and held-out customers."""

    task: TaskSpec
    train_candidates: dict[str, list[Candidate]]
    eval_candidates: dict[str, list[Candidate]]
    stats: TaskStats
    load_report: LoadReport

    @classmethod
    def build(
        cls,
        events: list[Event],
        task: TaskSpec,
        *,
        eval_fraction: float,
        salt: str,
        report: LoadReport,
        split: str = "customer",
        cutoff: datetime | None = None,
        labels: object = None,
        require_both: bool = True,
    ) -> MerchantData:
        """`split="customer"`: held-out customers never train. `split="time"` also needs `cutoff`,
        the run config's public `eval-cutoff`: held-out customers are drawn the same way and keep
        only sessions that start at or after it, training customers only sessions that end before
        it (no future events in training, no customer in both sets)."""
        candidates, stats = build_candidates(task, events, labels=labels)
        if split == "time":
            if cutoff is None:
                raise ValueError(
                    "eval-split=time needs eval-cutoff, a public ISO date/time in the run config "
                    '(e.g. eval-cutoff="2026-02-01"); set it or use eval-split=customer'
                )
            train, held_out = split_by_time(candidates, cutoff=cutoff, eval_fraction=eval_fraction, salt=salt)
        elif split == "customer":
            train_ids, eval_ids = split_customers(candidates, eval_fraction=eval_fraction, salt=salt)
            train = {c: candidates[c] for c in train_ids}
            held_out = {c: candidates[c] for c in eval_ids}
        else:
            raise ValueError(f"eval-split must be 'customer' or 'time', got {split!r}")
        if require_both and (not train or not held_out):
            raise ValueError(
                f"need examples for both training and evaluation, got {len(train)} and {len(held_out)} "
                f"customers from {len(candidates)} with a {task.name} example; "
                "add data or change eval-fraction"
            )
        return cls(task, train, held_out, stats, report)

    @property
    def train_customers(self) -> list[str]:
        return sorted(self.train_candidates)

    @property
    def eval_customers(self) -> list[str]:
        return sorted(self.eval_candidates)

    def train_round(self, round_seed: object, examples_per_customer: int = 1) -> list[Candidate]:
        """This round's training set: at most `examples_per_customer` examples per training customer,
        grouped by customer (customer-level DP-SGD clips each customer's summed gradient)."""
        return up_to_k_per_customer(
            self.train_candidates, self.train_customers, k=examples_per_customer, round_seed=round_seed
        )

    def evaluation(self) -> list[Candidate]:
        """The fixed held-out set: one example per evaluation customer, the same every round."""
        return one_per_customer(self.eval_candidates, self.eval_customers, round_seed="eval")


class Encoder:
    """Serialises candidates to text and tokenises them, caching each text by the events it is made of.

    The text is a function of the prefix alone, so the prefix itself is the cache key: no id can
    collide. Ids do: session ids may repeat across customers (legal in generic and JSON Lines
    exports), and one encoder serves every simulated merchant of a process, so a key of ids could
    hand one customer's text to another customer's example.
    """

    def __init__(self, tokenizer: object, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._count = tokenizer_counter(tokenizer)
        self._texts: dict[tuple[Event, ...], str] = {}  # Events are frozen: hashed and compared by value

    def text(self, candidate: Candidate) -> str:
        """The candidate's prefix as text, within `max_length` tokens with [CLS] and [SEP]."""
        key = candidate.prefix
        if key not in self._texts:
            # two special tokens ([CLS], [SEP]) share the budget with the events
            self._texts[key] = serialize(
                candidate.prefix, max_tokens=self.max_length - 2, count_tokens=self._count
            )
        return self._texts[key]

    def encode(self, candidates: list[Candidate]) -> Encoded:
        if not candidates:  # an empty set is encoded too: the round still releases its noise
            empty = torch.zeros((0, self.max_length), dtype=torch.long)
            return Encoded(
                input_ids=empty, attention_mask=empty.clone(), labels=torch.zeros(0, dtype=torch.long)
            )
        texts = [self.text(c) for c in candidates]
        batch = self.tokenizer(  # type: ignore[operator]
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return Encoded(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=torch.tensor([c.label for c in candidates], dtype=torch.long),
        )


def load_merchant_data(
    data_dir: Path,
    quarantine_dir: Path,
    task: TaskSpec,
    *,
    eval_fraction: float,
    salt: str,
    split: str = "customer",
    cutoff: datetime | None = None,
    require_both: bool = True,
) -> MerchantData:
    """Events (and, for customer-label, the merchant's labels) of `data_dir`, validated with bad rows
    quarantined to `quarantine_dir`, built into `task`'s split examples: what training and preview see."""
    from client.ingest.labels import find_labels, load_labels

    events, report = load_events(data_dir, quarantine_dir)
    labels = None
    if task.name == "customer-label":
        labels, label_report = load_labels(find_labels(data_dir), events, task.labels, quarantine_dir)
        log.info("%s: %d of %d label rows used", salt, label_report.good, label_report.total)
    return MerchantData.build(
        events,
        task,
        eval_fraction=eval_fraction,
        salt=salt,
        report=report,
        split=split,
        cutoff=cutoff,
        labels=labels,
        require_both=require_both,
    )
