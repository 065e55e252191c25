"""What a merchant releases when asked to evaluate: noisy histograms, charged before they leave.

Exact loss, accuracy, F1 and AUC never leave the merchant. An evaluation releases, per model
evaluated on the held-out customers, a `shared.histograms.Histogram` with Gaussian noise of
multiplier `eval-noise-multiplier` on every count (sensitivity 1: one held-out customer is one
example, one count). The local-only baseline (`client.baseline`) is released once per run: its
weights are perturbed (one Gaussian mechanism towards the training customers), then its held-out
histogram is noised like the model's. Every release is one step of a Gaussian mechanism, i.e. a
ledger `Charge(noise_multiplier=σ, sample_rate=1.0, steps=releases)`, written before anything is
sent and composed by the ledger's accountant with the training charges.

A merchant answers at most `max-evaluations-per-run` evaluations per run (counted in
`evaluations.json` in its state folder, written before the charge, so a crash over-counts). Its
exact metrics (and exact fine histograms) go to `evaluation-log.jsonl` in the same folder, for the
merchant's own eyes only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.fileio import atomic_write_json
from shared.histograms import Histogram
from shared.metrics import accuracy, macro_f1, roc_auc
from shared.privacy import Charge

log = logging.getLogger(__name__)

EVALUATIONS_FILE = "evaluations.json"
EVALUATION_LOG = "evaluation-log.jsonl"
BASELINE_RELEASES = 2
"""The baseline's perturbed weights and its noisy histogram: two Gaussian mechanisms."""


def release_charge(*, server_round: int, run_id: str, noise_multiplier: float, releases: int) -> Charge:
    """The ledger entry for `releases` Gaussian-mechanism releases at σ (sample rate 1, one step
    each; the clip norm field is the sensitivity, 1)."""
    return Charge(
        round=server_round,
        run_id=run_id,
        noise_multiplier=noise_multiplier,
        sample_rate=1.0,
        steps=releases,
        max_grad_norm=1.0,
    )


def planned_charges(
    *, run_id: str, num_rounds: int, noise_multiplier: float, max_per_run: int
) -> list[Charge]:
    """What a run's evaluations will charge at most: round 0 plus one per round (capped at
    `max_per_run`), and the baseline once. Training noise is calibrated with this reserved."""
    evaluations = min(num_rounds + 1, max_per_run)
    if evaluations == 0:
        return []
    return [
        release_charge(
            server_round=0,
            run_id=run_id,
            noise_multiplier=noise_multiplier,
            releases=evaluations + BASELINE_RELEASES,
        )
    ]


@dataclass
class EvaluationCounter:
    """Evaluations answered per run, and whether the run's baseline went out (`evaluations.json`)."""

    path: Path
    runs: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def open(cls, state_dir: Path) -> EvaluationCounter:
        path = state_dir / EVALUATIONS_FILE
        if not path.exists():
            return cls(path)
        try:
            runs = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); it bounds how often this merchant answers, restore it "
                "from backup rather than delete it"
            ) from None
        counts = {
            str(k): {"evaluations": int(v["evaluations"]), "baseline": int(v["baseline"])}
            for k, v in runs.items()
        }
        return cls(path, counts)

    def answered(self, run_id: str) -> int:
        return self.runs.get(run_id, {}).get("evaluations", 0)

    def baseline_sent(self, run_id: str) -> bool:
        return bool(self.runs.get(run_id, {}).get("baseline", 0))

    def record(self, run_id: str, *, baseline: bool) -> None:
        """Count one more evaluation of `run_id` (and its baseline) and persist it atomically."""
        entry = self.runs.setdefault(run_id, {"evaluations": 0, "baseline": 0})
        entry["evaluations"] += 1
        entry["baseline"] = int(entry["baseline"] or baseline)
        atomic_write_json(self.path, self.runs)


@dataclass(frozen=True)
class HeldOut:
    """Held-out labels and the class probabilities a model gave them."""

    labels: np.ndarray
    probabilities: np.ndarray


def noisy_histograms(
    results: dict[str, HeldOut], noise_multiplier: float, *, seed: int | None = None
) -> dict[str, Histogram]:
    """The released form of each result: its histogram with Gaussian noise (the caller charged it)."""
    return {
        name: Histogram.of(r.labels, r.probabilities).noised(
            noise_multiplier, seed=None if seed is None else seed + i
        )
        for i, (name, r) in enumerate(sorted(results.items()))
    }


def log_locally(state_dir: Path, record: dict[str, object]) -> None:
    """Append the exact metrics to the merchant's own evaluation log (never sent)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / EVALUATION_LOG).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


LOCAL_BINS = 1000
"""Bins of the exact histograms in the local log: fine enough that pooling several merchants' logs
(a simulation owns them all) gives the pooled AUC to about 0.001."""


def exact_metrics(results: dict[str, HeldOut]) -> dict[str, dict[str, object]]:
    """Exact (noise-free, unbinned) metrics of each result and its fine exact histogram (`counts`,
    `LOCAL_BINS` bins for binary tasks): for the local log only."""
    out: dict[str, dict[str, object]] = {}
    for name, r in results.items():
        predicted = r.probabilities.argmax(axis=1)
        binary = r.probabilities.shape[1] == 2
        out[name] = {
            "examples": float(len(r.labels)),
            "accuracy": accuracy(r.labels, predicted),
            "macro_f1": macro_f1(r.labels, predicted, r.probabilities.shape[1]),
            "auc": roc_auc(r.labels, r.probabilities[:, 1]) if binary else None,
            "counts": Histogram.of(r.labels, r.probabilities, bins=LOCAL_BINS).to_values(),
        }
    return out
