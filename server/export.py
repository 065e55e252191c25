"""The final artefact: the global adapter in PEFT format plus a model card with the DP settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.metrics import describe_metrics
from server.provenance import release_description, trained_description
from shared.adapters import AdapterState, load_adapter
from shared.config import RunConfig
from shared.fileio import atomic_write_json
from shared.model import MEAN_POOLINGS, POOLING, resolve_backbone

RUN_CONFIG_FILE = "run-config.json"
"""The run config (kebab-case keys) beside the adapter in `final/`."""


def export_final(
    model: torch.nn.Module,
    adapter: AdapterState,
    folder: Path,
    cfg: RunConfig,
    last_row: dict[str, Any],
    epsilons: dict[str, dict[str, Any]],
) -> Path:
    """Save `adapter` with `save_pretrained` (loadable by `PeftModel.from_pretrained`) and a README."""
    load_adapter(model, adapter)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))  # type: ignore[operator]
    (folder / "README.md").write_text(model_card(cfg, last_row, epsilons), encoding="utf-8")
    # machine-readable: predict and the merged export read task, labels, backbone, pooling from it
    atomic_write_json(folder / RUN_CONFIG_FILE, cfg.to_record())
    return folder


_POOLED = {
    "mean-l2": "attention-masked mean of the last hidden states, scaled to unit length",
    "mean": "attention-masked mean of the last hidden states",
    "cls": "pooled [CLS] vector",
}


def _base_class(cfg: RunConfig) -> str:
    return (
        f"shared.model.{POOLING[cfg.pooling].__name__}"
        if cfg.pooling in MEAN_POOLINGS
        else "BertForSequenceClassification"
    )


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _merchant_table(epsilons: dict[str, dict[str, Any]]) -> list[str]:
    """One row per merchant; privacy unit and accountant columns only if merchants reported them."""
    extra = [k for k in ("privacy_unit", "accountant") if any(info.get(k) for info in epsilons.values())]
    header = ["merchant", "epsilon", "delta", *(k.replace("_", " ") for k in extra), "status in last round"]
    rows = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for merchant, info in sorted(epsilons.items()):
        cells = [merchant, _num(info.get("epsilon")), str(info.get("delta"))]
        cells += [str(info.get(k) or "-") for k in extra] + [str(info.get("status", "-"))]
        rows.append(f"| {' | '.join(cells)} |")
    return rows


def model_card(cfg: RunConfig, last_row: dict[str, Any], epsilons: dict[str, dict[str, Any]]) -> str:
    task = cfg.task_spec
    g = last_row.get("global", {})
    lines = [
        f"# fedbehavior adapter: {task.name}",
        "",
        f"Adapter in PEFT format for `{resolve_backbone(cfg.backbone)}`. "
        f"Trained: {trained_description(cfg)}, by federated averaging over merchants, each running "
        "DP-SGD (Opacus) on its own customers.",
        "",
        f"Load it with `PeftModel.from_pretrained({_base_class(cfg)}.from_pretrained(backbone, "
        f"num_labels={task.num_labels}), this_folder)`. Labels: {', '.join(task.labels)}. The head reads "
        f"the {_POOLED[cfg.pooling]} (`pooling` in the run config).",
        "",
        "## Differential privacy",
        "",
        "- privacy unit: one customer (its data moves each noisy step by at most the clip norm), "
        "except at a merchant whose data has no customer ids (a YooChoose store): there it is one session; "
        "each merchant's ledger records its unit (`privacy_unit`)",
        "- mechanism: DP-SGD, Poisson sampling, per-example clipping at "
        f"max-grad-norm {cfg.max_grad_norm}, Gaussian noise calibrated by each merchant from its own budget",
        "- accountant: each merchant's own (`accountant` in its ledger): PLD (privacy-loss distribution, "
        "the default) or RDP (Rényi DP), of the Poisson-subsampled Gaussian, composed over every round "
        "and run",
        f"- rounds: {last_row.get('round', 0)} of {cfg.num_rounds} planned; local epochs {cfg.epochs}"
        + (" (fewer where a merchant's budget fits no more)" if len(cfg.epoch_options) > 1 else "")
        + ", "
        f"batch size {cfg.batch_size}",
        "",
        *_merchant_table(epsilons),
        "",
        "Each merchant's guarantee is (epsilon, delta)-DP with respect to adding or removing one of its "
        "privacy units, for everything its adapter updates reveal. Outside that accounting, a training reply "
        "carries exact scalars (the merchant's public training size, steps, sampling rate, noise multiplier "
        "and the round's mean training loss), and every reply its status: `fedbehavior export` lists them "
        "in `privacy.json` (`not_covered`).",
        "",
        f"## Federated evaluation (round {last_row.get('round', 0)}, held-out customers)",
        "",
        release_description(g.get("eval_noise")),
        "",
        *(f"- {line}" for line in describe_metrics(g, band95=True)),
    ]
    return "\n".join(lines) + "\n"
