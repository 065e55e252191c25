"""`metrics.jsonl` (one JSON object per round), the compact console table, and pooled evaluation.

Row format (a contract): {"round", "time_s", "global": {"accuracy", "macro_f1", "auc"?, "loss"?,
"examples", "local_baseline"?: {…}}, "merchants": {id: {"status", "epsilon", "delta", "examples"
(the merchant's public training size, never its exact count), "bytes_up", "noise_multiplier",
"sample_rate", "steps", "max_epsilon", "accountant", "privacy_unit", "evaluation": {"status",
"accuracy", …}, "local_baseline"?: {…}}}}.
Round 0 is the evaluation of the initial, untrained adapter (its merchants have status "evaluated").
A later round lists the merchants sampled to train, and with status "evaluated" every merchant whose
evaluation it charged without training it, so each merchant's last epsilon is on the record.
The DP parameters (`train_entry`) are the merchant's report of its round's ledger charge; null when
the merchant sent none (a refusal) or sent one out of range.

"global" is computed from the *sum* of every merchant's noisy histograms (`shared.histograms`): the
pooled AUC over all held-out customers, not a mean of per-merchant AUCs. Each merchant's
"evaluation" comes from its own noisy histogram alone, so it is much noisier than the pooled one.
`local_baseline` (each merchant's counts logistic regression, sent once per run) is pooled the same way.

Noise (added fields; the metrics above keep their names and meaning): when every pooled merchant
reported its evaluation noise multiplier σ, "global" (and each `local_baseline` and merchant
`evaluation`) also holds `noise_sd` (metric → the sd the noise gives it), `bands` (metric → {"value",
"sd", "low", "high" (the 95% band), "readable", "reason"?}: `shared.noise_bands`, which says when a
metric is unreadable) and `eval_noise` ({"per_count_sd", "noise_multiplier": {merchant: σ}, "max_sd",
"min_sds"}: the noise every pooled count carries and the readability thresholds). `examples`, a sum
of noisy counts, is rounded to a whole number.
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

from shared.histograms import LOCAL_BASELINE, MODEL, Histogram
from shared.noise_bands import MAX_SD, MIN_SDS, Band, band_of, bands, describe_all, per_count_sd

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


METRIC_COLUMNS = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("auc", "AUC"), ("loss", "loss"))
CELL = 13  # "0.745 ±0.031", "unreadable"
LEGEND = (
    f"(± = the noise sd of each value, from the merchants' evaluation noise; unreadable = the noise "
    f"swamps it: sd > {MAX_SD:g}, or a count within {MIN_SDS:g} sd of zero; "
    "`fedbehavior coordinator report` says why)"
)


def header() -> str:
    """The console table's column names and, below them, how to read its noisy cells."""
    metrics = " ".join(f"{name:>{CELL}}" for _, name in METRIC_COLUMNS)
    return (
        f"{'round':>5} {'trained':>7} {'refused':>7} {'rejected':>8} {'failed':>6} "
        f"{metrics} {'examples':>11} {'max ε':>6} {'time s':>7}\n{LEGEND}"
    )


def _fmt(value: Any, width: int, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


def row_bands(metrics: Mapping[str, Any]) -> dict[str, Band] | None:
    """The noise bands of a row's `global` (or `local_baseline`, or a merchant's `evaluation`):
    its `bands`, or for rows written before them its `noise_sd` (unreadable where null or above
    `MAX_SD`); None when the row carries no noise information (an evaluation without noise)."""
    if isinstance(metrics.get("bands"), dict):
        return {k: Band.from_record(v, k) for k, v in metrics["bands"].items() if isinstance(v, dict)}
    if isinstance(metrics.get("noise_sd"), dict):
        sds = metrics["noise_sd"]
        return {k: band_of(k, metrics.get(k), sds.get(k)) for k in sds if k != "examples"}
    return None


def describe_metrics(metrics: Mapping[str, Any], *, band95: bool = False) -> list[str]:
    """Each metric of a row's `global` (or `local_baseline`, or a merchant's `evaluation`) as people
    read it: "AUC 0.620 ± 0.040" (± = noise sd; `band95` adds the 95% band), "AUC unreadable (noise sd
    0.31 > 0.1; needs ~3,600 more held-out customers)", or the plain value when the row carries no
    noise information. Counts are whole numbers."""
    return describe_all(metrics, row_bands(metrics) or {}, band95=band95)


def _cell(key: str, value: Any, band: Band | None, width: int, digits: int = 3) -> str:
    if band is None:
        return _fmt(value, width, digits)
    if key == "examples" and band.value is not None and band.sd is not None:
        pass  # a count with its noise sd says itself how much it is worth: "392 ±277"
    elif not band.readable or band.value is None or band.sd is None:
        return f"{'unreadable':>{width}}"
    return f"{f'{band.value:.{digits}f} ±{band.sd:.{digits}f}':>{width}}"


def format_row(row: dict[str, Any]) -> str:
    counts = Counter(m["status"] for m in row["merchants"].values())
    eps = [m["epsilon"] for m in row["merchants"].values() if m.get("epsilon") is not None]
    g = row["global"]
    found = row_bands(g)
    cells = " ".join(
        _cell(key, g.get(key), None if found is None else found.get(key), CELL) for key, _ in METRIC_COLUMNS
    )
    examples = _cell("examples", g.get("examples"), None if found is None else found.get("examples"), 11, 0)
    return (
        f"{row['round']:>5} {counts['trained']:>7} {counts['refused-budget']:>7} "
        f"{counts['rejected-update']:>8} {counts['failed']:>6} {cells} {examples} "
        f"{_fmt(max(eps) if eps else None, 6, 2)} {_fmt(row['time_s'], 7, 1)}"
    )


class RoundFollower:
    """Prints the rows a running coordinator appends to `metrics.jsonl`, as the console table:
    `coordinator run --wait` calls `poll` while it waits, so a coordinator sees each round as it ends.

    Reads only complete lines (a row being written is picked up at the next poll)."""

    def __init__(self, path: Path, out: TextIO) -> None:
        self.path, self.out = path, out
        self.read = 0  # bytes of complete lines already shown
        self.shown = 0

    def poll(self) -> int:
        """Print the rows appended since the last poll; return how many."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.read)
                chunk = handle.read()
        except FileNotFoundError:
            return 0
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.read += len(complete)
        new = 0
        for line in complete.decode("utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = format_row(row)
            except (ValueError, KeyError, TypeError) as err:  # a row this version cannot show
                text = f"(a row of {self.path.name} not shown: {err})"
            if self.shown == 0:
                self.out.write(header() + "\n")
            self.out.write(text + "\n")
            self.shown += 1
            new += 1
        if new:
            self.out.flush()
        return new


def with_noise(metrics: dict[str, Any], histogram: Histogram, sigmas: Mapping[str, float]) -> dict[str, Any]:
    """`metrics` (of the noisy `histogram`) with `examples` rounded and, when `sigmas` (the σ of every
    merchant whose counts it sums) is non-empty, `noise_sd`, `bands` and `eval_noise` added."""
    out = dict(metrics)
    if out.get("examples") is not None:
        out["examples"] = round(out["examples"])  # a sum of noisy counts: its decimals are noise
    if not sigmas:
        return out
    cell_sd = per_count_sd(sigmas.values())
    found = bands(histogram.counts, histogram.kind, cell_sd, metrics)
    out["noise_sd"] = {k: b.sd for k, b in found.items()}
    out["bands"] = {k: b.to_record() for k, b in found.items()}
    out["eval_noise"] = {
        "per_count_sd": cell_sd,
        "noise_multiplier": dict(sorted(sigmas.items())),
        "max_sd": MAX_SD,
        "min_sds": MIN_SDS,
    }
    return out


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

    `noise`: each merchant's evaluation noise multiplier (the σ its counts carry). When every merchant
    in a sum reported one, that sum's metrics get their noise bands (`with_noise`): a pooled AUC of
    0.62 with a noise sd of 0.15 says nothing, and its band says so. A missing σ would understate the
    noise, so then no band is given.
    """
    totals: dict[str, Histogram] = {}
    senders: dict[str, list[str]] = {}
    own: dict[str, dict[str, Any]] = {}
    sigma = {m: float(v) for m, v in (noise or {}).items() if isinstance(v, int | float) and v > 0}
    for merchant, histograms in sorted(reports.items()):
        for name, values in sorted(histograms.items()):
            try:
                histogram = Histogram.from_values(values, num_labels)
            except ValueError as err:
                log.warning("histogram %s of %s left out: %s", name, merchant, err)
                continue
            totals[name] = totals[name] + histogram if name in totals else histogram
            senders.setdefault(name, []).append(merchant)
            mine = {merchant: sigma[merchant]} if merchant in sigma else {}
            own.setdefault(merchant, {})["evaluation" if name == MODEL else name] = with_noise(
                histogram.metrics(), histogram, mine
            )

    def pooled_of(name: str) -> dict[str, Any]:
        known = {m: sigma[m] for m in senders[name] if m in sigma}
        complete = len(known) == len(senders[name])
        return with_noise(totals[name].metrics(), totals[name], known if complete else {})

    if MODEL not in totals:
        return {}, own
    pooled = pooled_of(MODEL)
    if LOCAL_BASELINE in totals:
        pooled[LOCAL_BASELINE] = pooled_of(LOCAL_BASELINE)
    return pooled, own
