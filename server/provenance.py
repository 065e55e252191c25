"""DP provenance of a run, from what its folder holds: `privacy.json` and the export's model card.

Sources, in this order: `metrics.jsonl` (each merchant's status, epsilon and delta per round, and
each training round's charge as the merchant reported it: noise multiplier, sampling rate, steps,
budget, accountant, privacy unit; `server.metrics.train_entry`; the last round's pooled metrics with
their noise bands and the merchants' evaluation noise), the run config in `final/run-config.json`
(clip norm, rounds, task, what was trained), the merchant table of `final/README.md` (privacy unit,
accountant), and, for a simulation, `exact-metrics.jsonl` (exact pooled metrics that only a
simulation's operator can compute). Nothing is invented: a value the run folder does not hold is
written as `NOT_REPORTED`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.metrics import describe_metrics, row_bands
from shared.config import RunConfig
from shared.noise_bands import MAX_SD, MIN_SDS

NOT_REPORTED = "not reported by the merchant"
MERCHANT_KEYS = ("accountant", "privacy_unit", "noise_multiplier", "sample_rate", "max_epsilon")
"""Per-merchant values taken from the latest round that reports them (metrics.jsonl or the card)."""
ROUND_CHARGE_KEYS = ("noise_multiplier", "sample_rate", "steps")
"""A training round's ledger charge as the merchant reported it, kept per round in `per_round`."""

NOT_COVERED = [
    "training replies: the example count, steps, sampling rate and noise multiplier (exact: together "
    "they reveal a merchant's training-customer count up to rounding) and the round's mean training loss",
    "training replies: the merchant's budget (max epsilon), accountant and privacy unit: its settings "
    "and whether its data has customer ids, no count or value of its data",
    "status, merchant id, a fixed short reason and bytes on the wire: whether and when a merchant took "
    "part or refused is visible to the coordinator",
    "the run config and the label space (public by design: fixed by the coordinator)",
    "data scored with this model (`fedbehavior predict`): predictions are post-processing of the model, so "
    "they cost the training data nothing more, but the scored customers' own data is not protected by "
    "these epsilons",
]
"""What each merchant releases outside its DP accounting (README, "The privacy guarantee")."""

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
    each = ", ".join(f"{m} {_cell(float(v))}" for m, v in sigmas.items())
    return (
        "Evaluation metrics are released as noisy counts, never exactly: each merchant adds Gaussian noise "
        f"of standard deviation σ (its own eval-noise-multiplier: {each}) to every count of its held-out "
        "histogram (sensitivity 1: one customer is one count), charged to its ledger. The coordinator sums "
        f"the counts (noise sd {_cell(float(noise.get('per_count_sd', 0.0)))} per pooled count) and derives "
        "the metrics from the sums; each comes with its noise sd (±) propagated from σ. A metric is "
        f"unreadable when its noise sd exceeds {_cell(float(noise.get('max_sd', MAX_SD)))} or a count it "
        f"divides by is within {_cell(float(noise.get('min_sds', MIN_SDS)))} noise sd of zero."
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


def card_merchant_table(card: Path) -> dict[str, dict[str, str]]:
    """The merchant table of a `final/README.md` model card, as {merchant: {column: value}}."""
    if not card.exists():
        return {}
    lines = card.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| merchant |")), None)
    if start is None:
        return {}
    header = [c.strip().replace(" ", "_") for c in lines[start].strip("|").split("|")]
    table: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = dict(zip(header, cells, strict=False))
        table[row["merchant"]] = {k: v for k, v in row.items() if v not in ("", "-")}
    return table


def round_epsilon(entry: dict[str, Any]) -> float | None:
    """A merchant's epsilon at the end of a round: the one it reported after the round's evaluation
    charge, else the one after its training charge (None if it reported neither)."""
    evaluation = entry.get("evaluation")
    after = evaluation.get("epsilon") if isinstance(evaluation, dict) else None
    return after if after is not None else entry.get("epsilon")


def _merchant_record(name: str, rows: list[dict[str, Any]], card: dict[str, str]) -> dict[str, Any]:
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
        record[key] = latest.get(key, card.get(key, NOT_REPORTED))
    record["steps"] = sum(steps) if steps else NOT_REPORTED
    record["rounds_trained"] = sum(1 for r in per_round if r["status"] == "trained")
    record["status_last_round"] = per_round[-1]["status"] if per_round else NOT_REPORTED
    record["per_round"] = per_round
    return record


def privacy_record(run_dir: Path, cfg: RunConfig | None) -> dict[str, Any]:
    """Everything the run folder says about privacy and quality, as JSON-ready data (`privacy.json`)."""
    rows = read_rows(run_dir)
    exact = [r for r in read_exact(run_dir) if r.get("round") == max((x["round"] for x in rows), default=0)]
    exact_last = {"round": exact[-1]["round"], **exact[-1].get("model", {})} if exact else None
    card = card_merchant_table(run_dir / "final" / "README.md")
    names = sorted({m for row in rows for m in row.get("merchants", {})} | set(card))
    last: dict[str, Any] = max(rows, key=lambda r: r["round"]) if rows else {"round": 0, "global": {}}
    run_cfg = "final/run-config.json"
    return {
        "run": run_dir.resolve().name,
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
        "merchants": {n: _merchant_record(n, rows, card.get(n, {})) for n in names},
        "not_covered": NOT_COVERED,
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
            *(["final/README.md"] if card else []),
            *([EXACT_FILE] if exact_last else []),
        ],
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


PRIVACY_COLUMNS = (
    "epsilon",
    "delta",
    "accountant",
    "privacy_unit",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "rounds_trained",
    "status_last_round",
)


def provenance_markdown(record: dict[str, Any]) -> list[str]:
    """The model card's privacy and evaluation sections, from `privacy_record`'s output."""
    header = ["merchant", *(c.replace("_", " ") for c in PRIVACY_COLUMNS)]
    lines = [
        "## Differential privacy (per merchant)",
        "",
        f"- mechanism: {record['mechanism']}",
        f"- clipping norm: {_cell(record['clipping_norm'])} ({record['clipping_norm_source']})",
        f"- rounds: {record['rounds']['completed']} completed of {record['rounds']['planned']} planned",
        "",
        f"| {' | '.join(header)} |",
        "|" + "---|" * len(header),
    ]
    for name, m in record["merchants"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(m[c]) for c in PRIVACY_COLUMNS) + " |")
    lines += [
        "",
        "Each merchant's guarantee is (epsilon, delta)-DP for one of its privacy units, for everything its "
        f'adapter updates reveal. "{NOT_REPORTED}": the run folder does not hold that value.',
        "",
        "Not covered by the guarantee:",
        "",
        *(f"- {item}" for item in record["not_covered"]),
        "",
        f"## Evaluation (round {record['metrics']['round']})",
        "",
        f"Evaluation set: {record['metrics']['evaluation_set']}.",
        "",
        record["metrics"].get("release", release_description(None)),
        "",
        *(f"- {line}" for line in describe_metrics(_with_bands(record["metrics"]), band95=True)),
        *exact_markdown(record["metrics"].get("exact")),
    ]
    return lines


def _with_bands(metrics: dict[str, Any]) -> dict[str, Any]:
    """The record's last-round values with its bands, as `describe_metrics` reads a row."""
    values = {k: v for k, v in metrics["values"].items() if k not in ("bands", "noise_sd")}
    return values | ({"bands": metrics["bands"]} if metrics.get("bands") else {})


def exact_markdown(exact: dict[str, Any] | None) -> list[str]:
    """The exact pooled metrics of a simulation's last round, labelled as such ([] for a deployment)."""
    if not exact:
        return []
    cells = ", ".join(
        f"{name} {exact[key]:.3f}"
        for key, name in (
            ("accuracy", "accuracy"),
            ("macro_f1", "macro-F1"),
            ("auc", "AUC"),
            ("loss", "loss"),
        )
        if key in exact
    )
    return [
        "",
        f"Exact pooled metrics of round {exact['round']} (simulation only: its operator holds every "
        f"merchant's local evaluation log, which a deployment never releases): {cells}.",
    ]
