"""What a merchant releases when asked to evaluate: noisy histograms, charged before they leave.

Exact loss, accuracy, F1 and AUC never leave the merchant. An evaluation releases, per model
evaluated on the held-out customers, a `shared.histograms.Histogram` with Gaussian noise of
multiplier `eval-noise-multiplier` on every count (sensitivity 1: one held-out customer is one
example, one count). The local-only baseline (`client.evaluation.baseline`) is released once per run: its
weights are perturbed (one Gaussian mechanism towards the training customers), then its held-out
histogram is noised like the model's. Every release is one step of a Gaussian mechanism, i.e. a
ledger `Charge(noise_multiplier=σ, sample_rate=1.0, steps=releases)`, written before anything is
sent and composed by the ledger's accountant with the training charges.

How often a merchant answers, and what each answer charges, is decided in `client.training.budget` (the
run book counts evaluations per run record, under the ledger's lock, before the charge). Its exact
metrics (and exact fine histograms) go to `evaluation-log.jsonl` in the state folder, for the
merchant's own eyes only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.histograms import Histogram
from shared.metrics import accuracy, macro_f1, roc_auc

log = logging.getLogger(__name__)

EVALUATION_LOG = "evaluation-log.jsonl"


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
        if len(r.labels) == 0:
            out[name] = {"examples": 0.0}
            continue
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
