"""`fedbehavior predict`: score sessions or customers with a trained model; also `predict(...)` in Python.

Input: anything the ingest reads (a Taobao/RetailRocket/YooChoose file, any CSV/Parquet/JSONL export
with `--map` / `--behavior-map` / `--attribute`), or a merchant data folder (`store/` or
`events.jsonl`). A file goes through `client.ingest.ingest` into a temporary folder and is then read
with `client.ingest.data.load_events`, exactly as training reads it, so bad rows are quarantined with the
same reasons; the quarantine is copied beside the output (`<out>.quarantine.parquet|jsonl`).

What is scored, and why (the text is built like training builds it, `shared.text.serialize` within
`max-length` tokens, most recent events kept):

* purchase-intent, next-behavior, category-intent: one row per session, from the whole session up to
  its last event. Training cut prefixes at a hashed position so that labels stayed in the future; for a
  live session the future is what we predict, so "now" is the end of what has been recorded. For
  purchase-intent, a session that already reached a leak role (cart/buy by default) lies outside what
  training saw (its prefixes stop before those events): the `in_funnel` column flags such rows.
* customer-label: one row per customer, from all its events (the serializer keeps the most recent).
* repeat-purchase: one row per customer who bought, from its events up to and including the first
  purchase, as in training; customers who never bought are counted as skipped.

`--runtime onnx` / `onnx-int8` score with ONNX Runtime on the CPU instead of PyTorch (the optional
extra: pip install 'fedbehavior[onnx]'; see client/training/onnx_backbone.py): the model is exported once
(cached under $FEDBEHAVIOR_ONNX_CACHE, default ~/.cache/fedbehavior/onnx). onnx gives the same
probabilities within 1e-4, 1.2-2.7x torch's speed on a busy 2-core CPU; onnx-int8 (int8 weights)
2.4-5.2x, the same ranking (AUC within 1e-3) but probabilities moved by ~0.04 on average
(simulations/bench_onnx.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shared.candidates import build_candidates
from shared.model import resolve_device
from shared.progress import progress
from shared.schema import Event
from shared.tasks import CUSTOMER_TASKS, TaskSpec, sessions_of
from shared.text import serialize, tokenizer_counter
from shared.trained import Trained, load_trained

if TYPE_CHECKING:
    from client.training.onnx_backbone import OnnxRunner

log = logging.getLogger(__name__)


@dataclass
class PredictReport:
    """What a prediction run read, scored and wrote."""

    out: str
    rows: int = 0
    total: int = 0
    good: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    quarantine_path: str = ""
    device: str = "cpu"
    runtime: str = "torch"


@dataclass(frozen=True)
class Input:
    """One thing to score: its key columns and the events its text is made of."""

    keys: dict[str, str]
    events: tuple[Event, ...]


def _leaks(events: Sequence[Event], task: TaskSpec) -> bool:
    roles = set(task.leak_roles)
    return any(e.behavior.value in roles for e in events)


def inputs_of(task: TaskSpec, events: Sequence[Event]) -> tuple[list[Input], dict[str, int]]:
    """What to score for `task` (see the module docstring), sorted by key, and skipped counts."""
    if task.name == "repeat-purchase":
        candidates, stats = build_candidates(task, events)  # the label it computes is not used
        found = [Input({"customer_id": c}, options[0].prefix) for c, options in sorted(candidates.items())]
        return found, dict(stats.skipped)
    if task.name in CUSTOMER_TASKS:  # customer-label: every event of the customer
        by_customer: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_customer[event.customer_id].append(event)
        return [Input({"customer_id": c}, tuple(evs)) for c, evs in sorted(by_customer.items())], {}
    sessions = sorted(sessions_of(events).items())
    return [Input({"customer_id": c, "session_id": s}, tuple(evs)) for (c, s), evs in sessions], {}


def score(
    trained: Trained,
    inputs: Sequence[Input],
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    runner: OnnxRunner | None = None,
) -> list[dict[str, Any]]:
    """One output row per input: its keys, event count, class probabilities and predicted label.
    With `runner` (client.training.onnx_backbone), ONNX Runtime computes the probabilities on the CPU."""
    device = torch.device("cpu") if runner is not None else device or next(trained.model.parameters()).device
    task, max_length = trained.task, trained.cfg.max_length
    count = tokenizer_counter(trained.tokenizer)
    rows: list[dict[str, Any]] = []
    trained.model.eval()
    batches = range(0, len(inputs), batch_size)
    for start in progress(batches, "scoring", unit=f"batches of {batch_size}", logger=log):
        chunk = inputs[start : start + batch_size]
        # two special tokens ([CLS], [SEP]) share the budget with the events, as in training
        texts = [serialize(i.events, max_tokens=max_length - 2, count_tokens=count) for i in chunk]
        # padded to the longest text, not to max-length: masked mean pooling ignores padding
        batch = trained.tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        if runner is not None:
            probs = runner.probabilities(batch)
        else:
            with torch.no_grad():
                probs = torch.softmax(trained.model(**batch).logits.float(), dim=-1).cpu()
        for item, p in zip(chunk, probs, strict=True):
            row: dict[str, Any] = {**item.keys, "events": len(item.events)}
            if task.name == "purchase-intent":
                row["in_funnel"] = _leaks(item.events, task)
            row["predicted"] = task.labels[int(p.argmax())]
            row.update({f"p_{label}": round(float(v), 6) for label, v in zip(task.labels, p, strict=True)})
            rows.append(row)
    return rows


def write_rows(rows: list[dict[str, Any]], out: Path) -> None:
    """`out` as CSV (header + one line per row) or JSON Lines, chosen by its extension."""
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif out.suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["customer_id"])
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        raise ValueError(f"--out must end in .csv or .jsonl, got {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


def read_events(
    source: Path, work: Path, report: PredictReport, **ingest_args: Any
) -> tuple[list[Event], Path]:
    """Events of `source` (a merchant data folder, or any file the ingest reads, ingested into `work`)
    with the counts filled into `report`; returns them and the quarantine file written."""
    from client.ingest.data import QUARANTINE_FILE, STORE_DIR, load_events

    folder = source
    if not (source.is_dir() and ((source / STORE_DIR).is_dir() or (source / "events.jsonl").exists())):
        from client.ingest import ingest

        folder = work / "ingested"
        done = ingest(source, ingest_args.pop("fmt"), folder, **ingest_args)
        report.total, report.good, report.quarantined = done.total, done.good, done.quarantined
        report.reasons = dict(done.reasons)
        events, _ = load_events(folder, work)  # the store was validated by ingest
        return events, done.quarantine_path
    events, loaded = load_events(folder, work)
    report.total, report.good, report.quarantined = loaded.total, loaded.good, loaded.quarantined
    report.reasons = dict(loaded.reasons)
    return events, work / QUARANTINE_FILE


def predict(
    model: Path,
    events: Path,
    out: Path,
    *,
    fmt: str = "generic",
    mapping: Mapping[str, str] | None = None,
    behavior_map: Mapping[str, str] | None = None,
    attributes: Sequence[str] = (),
    strict: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    device: str | None = None,
    runtime: str = "torch",
    threads: int = 0,
    onnx_cache: str | Path | None = None,
) -> PredictReport:
    """Score `events` with the model in `model` (a run's final/, the run folder, or an export) and
    write `out` (.csv or .jsonl). `overrides`: run-config keys the model folder lacks (older runs).
    `runtime`: torch, onnx or onnx-int8 (see the module docstring); `threads`: ONNX Runtime's threads
    (0: its default); `onnx_cache`: where exported graphs are kept (see client.training.onnx_backbone)."""
    from client.training.onnx_backbone import check_runtime

    out = Path(out)
    if out.suffix not in (".csv", ".jsonl"):
        raise ValueError(f"--out must end in .csv or .jsonl, got {out.name}")
    check_runtime(runtime)
    if runtime != "torch":
        if device and device not in ("auto", "cpu"):
            raise ValueError(
                f"--runtime {runtime} runs on the CPU: drop --device {device} or use --runtime torch"
            )
        device = "cpu"
    torch_device = resolve_device(device)
    report = PredictReport(out=str(out), device=str(torch_device), runtime=runtime)
    trained = load_trained(Path(model), overrides=overrides, device=torch_device)
    runner = None
    if runtime != "torch":
        from client.training.onnx_backbone import onnx_runner

        runner = onnx_runner(trained.model, runtime, threads=threads, cache_dir=onnx_cache)
    with tempfile.TemporaryDirectory(prefix="fedbehavior-predict-") as tmp:
        found, quarantine = read_events(
            Path(events),
            Path(tmp),
            report,
            fmt=fmt,
            mapping=dict(mapping) if mapping else None,
            behavior_map=dict(behavior_map) if behavior_map else None,
            attributes=tuple(attributes),
            strict=strict,
        )
        if report.quarantined and quarantine.exists():
            kept = out.with_name(f"{out.stem}.quarantine{quarantine.suffix}")
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(quarantine, kept)
            report.quarantine_path = str(kept)
    inputs, report.skipped = inputs_of(trained.task, found)
    rows = score(trained, inputs, batch_size=batch_size, device=torch_device, runner=runner)
    write_rows(rows, out)
    report.rows = len(rows)
    log.info("scored %d %s rows on %s (%s) -> %s", len(rows), trained.task.name, torch_device, runtime, out)
    return report


def cmd_predict(args: argparse.Namespace) -> int:
    """`fedbehavior predict`: run `predict` from parsed arguments and print a summary."""
    from shared.cli import parse_pairs
    from shared.config import parse_sets

    overrides = parse_sets(args.set)
    if args.task:
        overrides["task"] = args.task
    if args.threads < 0:
        raise ValueError("--threads must be >= 0 (0: the runtime's default)")
    if args.threads and args.runtime == "torch":
        torch.set_num_threads(args.threads)
    report = predict(
        Path(args.model),
        Path(args.events),
        Path(args.out),
        fmt=args.fmt,
        mapping=parse_pairs(args.map, "--map") or None,
        behavior_map=parse_pairs(args.behavior_map, "--behavior-map") or None,
        attributes=tuple(c.strip() for text in args.attribute for c in text.split(",") if c.strip()),
        strict=args.strict,
        overrides=overrides,
        batch_size=args.batch_size,
        device=args.device,
        runtime=args.runtime,
        threads=args.threads,
    )
    print(f"{report.total} rows: {report.good} good, {report.quarantined} quarantined")
    for reason, n in report.reasons.items():
        print(f"  {n:>9}  {reason}")
    if report.quarantine_path:
        print(f"quarantine: {report.quarantine_path}")
    for reason, n in report.skipped.items():
        print(f"  skipped {n} ({reason})")
    print(f"{report.rows} scored rows on {report.device} ({report.runtime}): {report.out}")
    return 0
