"""DP provenance of a run as data: the record written to `privacy.json`, from what the run folder holds.

Sources, in this order: `metrics.jsonl` (each merchant's status, epsilon and delta per round, and
each training round's charge as the merchant reported it: noise multiplier, sampling rate, steps,
budget, accountant, privacy unit; `server.metrics.train_entry`; the last round's pooled metrics with
their noise bands and the merchants' evaluation noise), the run config in `final/run-config.json`
(clip norm, rounds, task, what was trained), and, for a simulation, `exact-metrics.jsonl` (exact
pooled metrics that only a simulation's operator can compute). Nothing is invented: a value the run
folder does not hold (a run from before merchants reported it) is written as `NOT_REPORTED`.

The record is data first: `server.export.export_final` writes it to `final/privacy.json` and
`fedbehavior export` to the export's folder, and each renders its `README.md` from it
(`shared.model_card`). No Markdown is ever read back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.metrics import row_bands
from shared import protocol
from shared.config import RunConfig
from shared.model_card import NOT_REPORTED, CardOptions, cell, render_card
from shared.noise_bands import MAX_SD, MIN_SDS

PRIVACY_FILE = "privacy.json"
"""The provenance record beside a model: in a run's `final/` and in an export."""
CARD_FILE = "README.md"
"""The model card, rendered from the record (`shared.model_card`)."""
MERCHANT_KEYS = ("accountant", "privacy_unit", "noise_multiplier", "sample_rate", "max_epsilon")
"""Per-merchant values taken from the latest round of metrics.jsonl that reports them."""
ROUND_CHARGE_KEYS = ("noise_multiplier", "sample_rate", "steps")
"""A training round's ledger charge as the merchant reported it, kept per round in `per_round`."""


def not_covered() -> list[str]:
    """What a merchant releases outside its DP accounting: the reply values `shared.protocol`
    declares public (each with why it may leave: none is computed from customers' data), and what
    any participant shows or receives. Generated from the declarations, so the card cannot claim
    less or more than a reply carries."""
    public = [d for d in protocol.REPLY_FIELDS if d.kind == "public"]
    return [
        *(f"{' and '.join(d.replies)} replies: `{d.key}`, {d.why}" for d in public),
        "bytes on the wire and the time of each reply: whether and when a merchant took part or refused "
        "is visible to the coordinator",
        "the merchants' plan and the label space (public by design: fixed by the coordinator)",
        "data scored with this model (`fedbehavior predict`): predictions are post-processing of the "
        "model, so they cost the training data nothing more, but the scored customers' own data is not "
        "protected by these epsilons",
    ]


EVALUATION_SET = (
    "federated evaluation on each sampled merchant's held-out customers (never trained on), one example "
    "per customer; the coordinator pools the merchants' noisy count histograms (a Gaussian mechanism "
    "charged to each merchant's ledger) or, where a merchant sent none, weights its metrics by examples"
)


EXACT_FILE = "exact-metrics.jsonl"
"""A simulation's exact pooled metrics per round (`simulations.exact`): absent from a deployment."""


def trained_description(cfg: RunConfig) -> str:
    """What the run trained (and so what its adapter holds), in words: head only, LoRA or FFA-LoRA."""
    lora = cfg.lora
    where = f"rank {lora.r}, alpha {lora.alpha}, on {', '.join(lora.target_modules)}"
    if lora.trainable == "head":
        return (
            "the classifier head only (a DP linear probe over the frozen backbone; the LoRA matrices stay "
            "at their initialisation with B = 0, so the backbone is unchanged)"
        )
    if lora.mode == "ffa":
        return (
            f"FFA-LoRA ({where}: every A frozen at an initialisation drawn from the run's seed, only B "
            "trained and sent) and the classifier head"
        )
    return f"LoRA ({where}: A and B trained) and the classifier head"


def release_description(noise: dict[str, Any] | None) -> str:
    """How the evaluation metrics were released, from a row's `eval_noise` (None: no noise recorded)."""
    if not noise:
        return (
            "Evaluation metrics: the run recorded no evaluation noise for them (an evaluation without "
            "histograms, or a merchant that did not report its noise multiplier), so no noise band is given."
        )
    sigmas = noise.get("noise_multiplier") or {}
    each = ", ".join(f"{m} {cell(float(v))}" for m, v in sigmas.items())
    return (
        "Evaluation metrics are released as noisy counts, never exactly: each merchant adds Gaussian noise "
        f"of standard deviation σ (its own eval-noise-multiplier: {each}) to every count of its held-out "
        "histogram (sensitivity 1: one customer is one count), charged to its ledger. The coordinator sums "
        f"the counts (noise sd {cell(float(noise.get('per_count_sd', 0.0)))} per pooled count) and derives "
        "the metrics from the sums; each comes with its noise sd (±) propagated from σ. A metric is "
        f"unreadable when its noise sd exceeds {cell(float(noise.get('max_sd', MAX_SD)))} or a count it "
        f"divides by is within {cell(float(noise.get('min_sds', MIN_SDS)))} noise sd of zero."
    )


def read_exact(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a simulation's `exact-metrics.jsonl`, or [] (a deployment has none)."""
    path = run_dir / EXACT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of `run_dir/metrics.jsonl`, in file order; a clear error when there is none."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass a run folder (runs/<name>) written by a run")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def round_epsilon(entry: dict[str, Any]) -> float | None:
    """A merchant's epsilon at the end of a round: the one it reported after the round's evaluation
    charge, else the one after its training charge (None if it reported neither)."""
    evaluation = entry.get("evaluation")
    after = evaluation.get("epsilon") if isinstance(evaluation, dict) else None
    return after if after is not None else entry.get("epsilon")


def _merchant_record(name: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One merchant's figures: the latest epsilon/delta, per-round values, and reported settings."""
    per_round: list[dict[str, Any]] = []
    latest: dict[str, Any] = {}
    steps = []
    for row in rows:
        entry = row.get("merchants", {}).get(name)
        if entry is None:
            continue
        epsilon = round_epsilon(entry)
        per_round.append(
            {"round": row["round"], "status": entry.get("status"), "epsilon": epsilon}
            | {k: entry[k] for k in ROUND_CHARGE_KEYS if entry.get(k) is not None}
        )
        latest.update({k: v for k, v in entry.items() if v is not None})
        if epsilon is not None:
            latest["epsilon"] = epsilon
        if entry.get("steps") is not None:  # a trained reply's charge, its update accepted or rejected
            steps.append(int(entry["steps"]))
    record: dict[str, Any] = {
        "epsilon": latest.get("epsilon", NOT_REPORTED),
        "delta": latest.get("delta", NOT_REPORTED),
    }
    for key in MERCHANT_KEYS:
        record[key] = latest.get(key, NOT_REPORTED)
    record["steps"] = sum(steps) if steps else NOT_REPORTED
    record["rounds_trained"] = sum(1 for r in per_round if r["status"] == "trained")
    record["status_last_round"] = per_round[-1]["status"] if per_round else NOT_REPORTED
    record["per_round"] = per_round
    return record


def privacy_record(run_dir: Path, cfg: RunConfig | None) -> dict[str, Any]:
    """Everything the run folder says about privacy and quality, as JSON-ready data (`privacy.json`):
    `provenance_record` of its `metrics.jsonl` and `exact-metrics.jsonl` rows."""
    return provenance_record(run_dir.resolve().name, read_rows(run_dir), cfg, read_exact(run_dir))


def provenance_record(
    run: str,
    rows: Sequence[dict[str, Any]],
    cfg: RunConfig | None,
    exact_rows: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The provenance record of run `run` from its data alone: its `metrics.jsonl` rows, its run config
    (None: not in the run folder) and a simulation's `exact-metrics.jsonl` rows."""
    last_round = max((x["round"] for x in rows), default=0)
    exact = [r for r in exact_rows if r.get("round") == last_round]
    exact_last = {"round": exact[-1]["round"], **exact[-1].get("model", {})} if exact else None
    names = sorted({m for row in rows for m in row.get("merchants", {})})
    last: dict[str, Any] = max(rows, key=lambda r: r["round"]) if rows else {"round": 0, "global": {}}
    run_cfg = "final/run-config.json"
    return {
        "run": run,
        "trained": trained_description(cfg) if cfg else "not in the run folder",
        "task": (
            {"name": cfg.task, "labels": list(cfg.task_spec.labels)}
            if cfg
            else {"name": "not in the run folder", "labels": []}
        ),
        "mechanism": "DP-SGD (Opacus): Poisson sampling, per-example clipping, Gaussian noise; each merchant "
        "calibrates its noise from its own budget and charges its own ledger before releasing an update",
        "clipping_norm": cfg.max_grad_norm if cfg else f"not in the run folder (no {run_cfg})",
        "clipping_norm_source": f"run config max-grad-norm ({run_cfg}): the clip merchants train with",
        "rounds": {"planned": cfg.num_rounds if cfg else None, "completed": int(last["round"])},
        "merchants": {n: _merchant_record(n, rows) for n in names},
        "not_covered": not_covered(),
        "metrics": {
            "round": int(last["round"]),
            "evaluation_set": EVALUATION_SET,
            "values": {k: v for k, v in last.get("global", {}).items() if v is not None},
            "bands": {k: b.to_record() for k, b in (row_bands(last.get("global", {})) or {}).items()},
            "release": release_description(last.get("global", {}).get("eval_noise")),
            **({"exact": exact_last} if exact_last else {}),
        },
        "sources": [
            "metrics.jsonl",
            *([run_cfg] if cfg else []),
            *([EXACT_FILE] if exact_last else []),
        ],
    }


def write_provenance(folder: Path, record: dict[str, Any], options: CardOptions) -> None:
    """Write the record to `folder/privacy.json`, then `folder/README.md` rendered from it alone.
    Plain writes: a model folder is meant to be readable by others (0644)."""
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    (folder / PRIVACY_FILE).write_text(text, encoding="utf-8")
    (folder / CARD_FILE).write_text(render_card(record, options), encoding="utf-8")
