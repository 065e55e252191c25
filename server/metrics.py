"""`metrics.jsonl` (one JSON object per round), the compact console table, and pooled evaluation.

Row format (a contract): {"round", "time_s", "global": {"accuracy", "macro_f1", "auc"?, "loss"?,
"examples", "local_baseline"?: {…}}, "merchants": {id: {"status", "epsilon", "delta", "examples"
(the merchant's public training size, never its exact count), "bytes_up", "noise_multiplier",
"sample_rate", "steps", "max_epsilon", "accountant", "privacy_unit", "evaluation": {"status",
"accuracy", …}, "local_baseline"?: {…}}}}.
Round 0 is the evaluation of the initial, untrained adapter (its merchants have status "evaluated").
The DP parameters (`train_entry`) are the merchant's report of its round's ledger charge; null when
the merchant sent none (a refusal) or sent one out of range.

"global" is computed from the *sum* of every merchant's noisy histograms (`shared.histograms`): the
pooled AUC over all held-out customers, not a mean of per-merchant AUCs. Each merchant's
"evaluation" comes from its own noisy histogram alone, so it is much noisier than the pooled one.
`local_baseline` (each merchant's counts logistic regression, sent once per run) is pooled the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from shared.histograms import LOCAL_BASELINE, MODEL, Histogram, noise_errors

log = logging.getLogger(__name__)

GLOBAL_KEYS = ("accuracy", "macro_f1", "auc", "top3_accuracy", "loss")
FAILURE_FILE = "failure.json"
"""Beside `metrics.jsonl` when a run stopped: the round, the error and each merchant's status with its
public reason (`budget`, `policy`, …, or the coordinator's note such as a timeout)."""


def _in_range(key: str, value: float | None, ok: bool) -> float | None:
    if value is not None and not ok:
        log.warning("a merchant reported %s = %s, out of range: recorded as not reported", key, value)
        return None
    return value


def train_entry(
    status: str,
    metrics: Mapping[str, float],
    privacy: Mapping[str, str],
    *,
    examples: int,
    bytes_up: int,
) -> dict[str, Any]:
    """A merchant's entry in a training round's row: what it reported, its DP parameters bounded.

    The DP parameters are provenance (the model card, `privacy.json`), never used to weight or
    accept an update; a value outside its domain (a rate outside (0, 1], a fractional step count)
    is recorded as null rather than trusted (the domains of `shared.privacy.Charge`).
    """
    q, steps = metrics.get("sample_rate"), metrics.get("steps")
    sigma, budget = metrics.get("noise_multiplier"), metrics.get("max_epsilon")
    whole_steps = steps is not None and steps >= 0 and float(steps).is_integer()
    return {
        "status": status,
        "epsilon": metrics.get("epsilon"),
        "delta": metrics.get("delta"),
        "examples": examples,
        "bytes_up": bytes_up,
        "noise_multiplier": _in_range("noise_multiplier", sigma, sigma is not None and sigma > 0),
        "sample_rate": _in_range("sample_rate", q, q is not None and 0 < q <= 1),
        "steps": _int_or_none(_in_range("steps", steps, whole_steps)),
        "max_epsilon": _in_range("max_epsilon", budget, budget is not None and budget > 0),
        "accountant": privacy.get("accountant"),
        "privacy_unit": privacy.get("privacy-unit"),
    }


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


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
        f"{'accuracy':>8} {'macro-F1':>8} {'AUC':>6} {'±noise':>6} {'loss':>7} {'max ε':>6} {'time s':>7}"
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
        f"{_fmt(g.get('macro_f1'), 8)} {_fmt(g.get('auc'), 6)} "
        f"{_fmt((g.get('noise_sd') or {}).get('auc'), 6)} {_fmt(g.get('loss'), 7)} "
        f"{_fmt(max(eps) if eps else None, 6, 2)} {_fmt(row['time_s'], 7, 1)}"
    )


def pool_evaluations(
    reports: Mapping[str, Mapping[str, Sequence[float]]],
    num_labels: int,
    noise: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(pooled, per merchant) metrics from each merchant's histograms (`name → flat counts`).

    pooled: the model's metrics from the summed model histograms, plus `local_baseline` (the summed
    baseline histograms' metrics) when any merchant sent one; empty when no merchant sent a model
    histogram. Per merchant: `evaluation` and `local_baseline` from its own histograms. A histogram
    of the wrong size (the server knows the shape from the task, never takes it from the sender) is
    left out with a warning.

    `noise`: each merchant's evaluation noise multiplier (the σ its counts carry). When every pooled
    merchant reported one, `noise_sd` holds how much that noise moves each metric
    (`shared.histograms.noise_errors`): a pooled AUC of 0.62 with a `noise_sd` of 0.15 says nothing.
    """
    totals: dict[str, Histogram] = {}
    own: dict[str, dict[str, Any]] = {}
    pooled_from: list[str] = []
    for merchant, histograms in sorted(reports.items()):
        for name, values in sorted(histograms.items()):
            try:
                histogram = Histogram.from_values(values, num_labels)
            except ValueError as err:
                log.warning("histogram %s of %s left out: %s", name, merchant, err)
                continue
            totals[name] = totals[name] + histogram if name in totals else histogram
            own.setdefault(merchant, {})["evaluation" if name == MODEL else name] = histogram.metrics()
            if name == MODEL:
                pooled_from.append(merchant)
    if MODEL not in totals:
        return {}, own
    pooled: dict[str, Any] = totals[MODEL].metrics()
    sigmas = [(noise or {}).get(m) for m in pooled_from]
    if all(isinstance(v, float) and v > 0 for v in sigmas):
        cell_sd = math.sqrt(sum(float(v) ** 2 for v in sigmas if v is not None))
        pooled["noise_sd"] = noise_errors(totals[MODEL], cell_sd)
    if LOCAL_BASELINE in totals:
        pooled[LOCAL_BASELINE] = totals[LOCAL_BASELINE].metrics()
    return pooled, own
