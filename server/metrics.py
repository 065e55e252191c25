"""`metrics.jsonl` (one JSON object per round) and the compact console table.

Row format (a contract): {"round", "time_s", "global": {"accuracy", "macro_f1", "auc"?, "loss",
"examples"}, "merchants": {id: {"status", "epsilon", "delta", "examples", "train_loss", "bytes_up"}}}.
Round 0 is the evaluation of the initial, untrained adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

GLOBAL_KEYS = ("accuracy", "macro_f1", "auc", "top3_accuracy", "loss")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; readers get null
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLog:
    """Appends one row per round to `metrics.jsonl` (flushed and fsynced) and prints the table."""

    def __init__(self, path: Path, out: TextIO | None = None) -> None:
        self.path = path
        self.out = out
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.out is not None:
            if row["round"] == 0:
                self.out.write(header() + "\n")
            self.out.write(format_row(row) + "\n")
            self.out.flush()

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]


def header() -> str:
    return (
        f"{'round':>5} {'trained':>7} {'refused':>7} {'rejected':>8} {'failed':>6} "
        f"{'accuracy':>8} {'macro-F1':>8} {'AUC':>6} {'loss':>7} {'max ε':>6} {'time s':>7}"
    )


def _fmt(value: Any, width: int, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


def format_row(row: dict[str, Any]) -> str:
    counts = Counter(m["status"] for m in row["merchants"].values())
    eps = [m["epsilon"] for m in row["merchants"].values() if m.get("epsilon") is not None]
    g = row["global"]
    return (
        f"{row['round']:>5} {counts['trained']:>7} {counts['refused-budget']:>7} "
        f"{counts['rejected-update']:>8} {counts['failed']:>6} {_fmt(g.get('accuracy'), 8)} "
        f"{_fmt(g.get('macro_f1'), 8)} {_fmt(g.get('auc'), 6)} {_fmt(g.get('loss'), 7)} "
        f"{_fmt(max(eps) if eps else None, 6, 2)} {_fmt(row['time_s'], 7, 1)}"
    )
