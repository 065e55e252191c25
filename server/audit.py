"""Wire audit: one line per message a merchant sent, describing everything in it.

`wire-audit.jsonl` in the run folder lets a coordinator (and the merchants, who can ask for it) check
what left each merchant: tensor names, shapes, dtypes and byte counts of the adapter, and every scalar
metric and status value verbatim. It never stores tensor values. The file is written by the ServerApp
from the messages as they arrived, before anything else reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from shared import histograms, protocol

AUDIT_FILE = "wire-audit.jsonl"


def describe_message(msg: Message) -> dict[str, Any]:
    """What a reply carries; an error reply (the merchant dropped out) has no content."""
    entry: dict[str, Any] = {
        "src_node_id": int(msg.metadata.src_node_id),
        "message_type": str(msg.metadata.message_type),
    }
    if msg.has_error():
        entry["error"] = {"code": int(msg.error.code), "reason": str(msg.error.reason)}
        return entry
    records: dict[str, Any] = {}
    for name, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            tensors = {
                key: {
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                    "bytes": len(arr.data),  # as sent: the values plus Flower's serialisation header
                    "value_bytes": int(arr.numpy().nbytes),  # the values alone, from the decoded array
                }
                for key, arr in record.items()
            }
            records[name] = {"type": "arrays", "tensors": tensors}
        elif isinstance(record, MetricRecord):
            records[name] = {"type": "metrics", "values": {k: _plain(v) for k, v in record.items()}}
        elif isinstance(record, ConfigRecord):
            records[name] = {"type": "config", "values": {k: _plain(v) for k, v in record.items()}}
        else:  # pragma: no cover - Flower has no other record type today
            records[name] = {"type": type(record).__name__}
    entry["records"] = records
    entry["bytes"] = sum(
        t["bytes"] for r in records.values() if r["type"] == "arrays" for t in r["tensors"].values()
    )
    return entry


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value)}  # never copy opaque payloads into the log
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class WireAudit:
    """Appends message descriptions to `<run_dir>/wire-audit.jsonl` (fsynced)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / AUDIT_FILE

    def record(self, server_round: int, node_id: int, msg: Message | None) -> None:
        entry = {"round": server_round, "node_id": int(node_id)}
        entry.update(describe_message(msg) if msg is not None else {"missing": True})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_audit(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / AUDIT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


ALLOWED_RECORDS = {"arrays", "metrics", "status", histograms.RECORD, protocol.PRIVACY}
MAX_HISTOGRAM_VALUES = 4096  # a 64-label confusion matrix; a score histogram has 2 × bins
STATUS_KEYS = {"status", "merchant-id", "reason"}
MAX_HEADER_BYTES = 256  # a .npy header: dtype, shape, padding; anything more would be a hidden payload
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def audit_problems(entries: list[dict[str, Any]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Everything in the audited messages that is not an expected adapter tensor or a scalar.

    `expected` maps adapter tensor names to shapes (the global adapter the server sent out).
    """
    problems: list[str] = []
    for e in entries:
        where = f"round {e.get('round')} node {e.get('node_id')}"
        for name, rec in e.get("records", {}).items():
            if name not in ALLOWED_RECORDS:
                problems.append(f"{where}: unexpected record {name!r}")
            elif rec["type"] == "arrays":
                tensors = rec["tensors"]
                if set(tensors) != set(expected):
                    extra, missing = set(tensors) - set(expected), set(expected) - set(tensors)
                    problems.append(
                        f"{where}: tensor names differ (extra {sorted(extra)}, missing {sorted(missing)})"
                    )
                for key, t in tensors.items():
                    shape = tuple(t["shape"])
                    if key in expected and shape != tuple(expected[key]):
                        problems.append(f"{where}: {key} has shape {shape}, expected {expected[key]}")
                    width = DTYPE_BYTES.get(t["dtype"])
                    numel = 1
                    for d in shape:
                        numel *= d
                    if width is None:
                        problems.append(f"{where}: {key} has dtype {t['dtype']}, not a float")
                    elif t["value_bytes"] != numel * width:
                        problems.append(
                            f"{where}: {key} holds {t['value_bytes']} bytes, expected {numel * width}"
                        )
                    if not 0 <= t["bytes"] - t["value_bytes"] <= MAX_HEADER_BYTES:
                        problems.append(
                            f"{where}: {key} sends {t['bytes']} bytes for {t['value_bytes']} bytes of values"
                        )
            elif rec["type"] == "metrics" and name == histograms.RECORD:
                problems += _histogram_problems(where, rec["values"])
            elif rec["type"] == "metrics":
                for key, value in rec["values"].items():
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        problems.append(f"{where}: metric {key} is not a scalar: {value!r}")
            elif rec["type"] == "config" and name == protocol.PRIVACY:
                for key, value in rec["values"].items():
                    if value not in protocol.PRIVACY_VALUES.get(key, ()):
                        problems.append(f"{where}: privacy field {key}={value!r} is not allowed")
            elif rec["type"] == "config" and name == "status":
                for key, value in rec["values"].items():
                    if key not in STATUS_KEYS or not isinstance(value, str) or len(value) > 500:
                        problems.append(f"{where}: status field {key}={value!r} is not allowed")
            else:
                problems.append(f"{where}: record {name!r} has unexpected type {rec['type']}")
    return problems


def _histogram_problems(where: str, values: dict[str, Any]) -> list[str]:
    """Evaluation histograms (noisy counts, charged by the merchant): known names, lists of numbers."""
    problems = []
    for key, counts in values.items():
        if key not in histograms.NAMES:
            problems.append(f"{where}: unexpected histogram {key!r}")
        elif not isinstance(counts, list) or not 0 < len(counts) <= MAX_HISTOGRAM_VALUES:
            problems.append(f"{where}: histogram {key} is not a list of 1 to {MAX_HISTOGRAM_VALUES} counts")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in counts):
            problems.append(f"{where}: histogram {key} holds a value that is not a number")
    return problems
