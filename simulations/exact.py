"""Exact pooled metrics of a simulation, from every merchant's own evaluation log.

In a deployment the coordinator sees only the merchants' noisy histograms (DP, charged to their
ledgers), which on a few hundred held-out customers are too noisy to read a learning curve from. A
simulation's operator holds every merchant's folder, so it can pool the exact, fine histograms each
merchant logs locally (`state/evaluation-log.jsonl`, never sent): that is what this prints. It is a
research view, not something a coordinator can compute.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from client.evaluation.release import EVALUATION_LOG, LOCAL_BINS
from shared.histograms import Histogram


def exact_rounds(merchant_dirs: Iterable[Path], run_id: str, num_labels: int) -> list[dict[str, Any]]:
    """Per round: pooled exact metrics of the global model (and of the local baselines, if logged)."""
    pooled: dict[tuple[int, str], Histogram] = {}
    merchants: dict[int, int] = defaultdict(int)
    for folder in merchant_dirs:
        log = Path(folder) / "state" / EVALUATION_LOG
        if not log.exists():
            continue
        for line in log.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("run_id") != run_id:
                continue
            merchants[int(record["round"])] += 1
            for name, entry in record.items():
                if isinstance(entry, dict) and "counts" in entry:
                    hist = Histogram.from_values(entry["counts"], num_labels, bins=LOCAL_BINS)
                    key = (int(record["round"]), name)
                    pooled[key] = pooled[key] + hist if key in pooled else hist
    rows = []
    for rnd in sorted(merchants):
        row: dict[str, Any] = {"round": rnd, "merchants": merchants[rnd]}
        for (r, name), hist in sorted(pooled.items()):
            if r == rnd:
                row[name] = {k: v for k, v in hist.metrics().items() if v is not None}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a console table (global model's exact pooled AUC / accuracy / loss per round)."""
    lines = [
        "exact pooled metrics (simulation only, from every merchant's local log):",
        "round  merchants  accuracy  macro-F1     AUC    loss",
    ]
    for row in rows:
        m = row.get("model", {})
        cells = [f"{m[k]:.3f}" if k in m else "-" for k in ("accuracy", "macro_f1", "auc", "loss")]
        lines.append(f"{row['round']:>5}  {row['merchants']:>9}  " + "  ".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)
