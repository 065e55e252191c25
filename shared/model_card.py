"""The one model-card writer: a model folder's `README.md` is a rendering of that folder's record.

A run's `final/` and a `fedbehavior export` render their DP provenance record (`privacy.json`, built
from the run folder's data by `server.provenance`): what was trained, the task and labels, each
merchant's epsilon, delta, accountant, privacy unit and ledger charge, what the guarantee does not
cover, and the last round's federated metrics with their noise bands. A merchant's personalised
model renders its personalisation report (`client.evaluation.personalise`) and says that it is not
differentially private towards the merchant's own customers.

The card holds nothing the record does not, except what `CardOptions` adds: which kind of folder it
is, whether the adapter is merged, and how to load the folder (its writer knows its files). Markdown
is only ever written, never read back: tools read the record.

Imports only `shared.noise_bands` (numpy), so that server/ and client/ can both call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shared.noise_bands import Band, describe_all

NOT_REPORTED = "not reported by the merchant"
"""A record's value for what the run folder does not hold (a run from before it was reported)."""
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
"""The per-merchant figures of a provenance record the card's table (and the report's) shows."""

EXACT_NAMES = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("auc", "AUC"), ("loss", "loss"))
"""A simulation's exact pooled metrics a card lists, and how people read their names."""

FolderKind = Literal["final", "export", "personalised"]
FINAL: FolderKind = "final"
EXPORT: FolderKind = "export"
PERSONALISED: FolderKind = "personalised"
KINDS: tuple[FolderKind, ...] = (FINAL, EXPORT, PERSONALISED)


@dataclass(frozen=True)
class CardOptions:
    """What a card says beyond its record.

    `kind`: a run's `final/` (the coordinator's PEFT adapter), a `fedbehavior export`, or a merchant's
    personalised model; `merged`: an export whose LoRA is merged into the backbone (else a PEFT adapter
    folder); `loading`: Markdown lines saying how to load the folder; `record_file`: the file in the
    folder that holds the record the card renders."""

    kind: FolderKind
    merged: bool = False
    loading: tuple[str, ...] = ()
    record_file: str = "privacy.json"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model folder kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.merged and self.kind != EXPORT:
            raise ValueError("only an export is merged; a final/ or personalised folder is a PEFT adapter")


def render_card(record: Mapping[str, Any], options: CardOptions) -> str:
    """The folder's `README.md`: a provenance record (final/, export) or a personalisation report
    with the task added (personalised), rendered as Markdown."""
    lines = _personalised(record, options) if options.kind == PERSONALISED else _federated(record, options)
    return "\n".join(lines).rstrip("\n") + "\n"


# --- a federated model: final/ or export ----------------------------------------------------------------


def _title(record: Mapping[str, Any], options: CardOptions) -> str:
    task, run = record["task"]["name"], record["run"]
    if options.kind == FINAL:
        return f"# fedbehavior adapter: {task} (run {run})"
    return f"# fedbehavior {task} {'classifier' if options.merged else 'adapter'} (run {run})"


def _federated(record: Mapping[str, Any], options: CardOptions) -> list[str]:
    labels = ", ".join(f"{i} = {name}" for i, name in enumerate(record["task"]["labels"]))
    what = (
        "The run's final global adapter, in PEFT format, written by the coordinator when the run ended."
        if options.kind == FINAL
        else "An export of a finished run (`fedbehavior export`)."
    )
    return [
        _title(record, options),
        "",
        what,
        "",
        *options.loading,
        *([""] if options.loading else []),
        f"Trained: {record['trained']}, by federated averaging over merchants, each running DP-SGD (Opacus) "
        "on its own customers.",
        "",
        f"Task: `{record['task']['name']}`. Labels: {labels or '-'}. Machine-readable provenance: "
        f"`{options.record_file}` (this card is rendered from it).",
        "",
        *provenance_markdown(record),
    ]


def provenance_markdown(record: Mapping[str, Any]) -> list[str]:
    """The card's privacy and evaluation sections, from a provenance record."""
    header = ["merchant", *(c.replace("_", " ") for c in PRIVACY_COLUMNS)]
    lines = [
        "## Differential privacy (per merchant)",
        "",
        f"- mechanism: {record['mechanism']}",
        f"- clipping norm: {cell(record['clipping_norm'])} ({record['clipping_norm_source']})",
        f"- rounds: {record['rounds']['completed']} completed of {record['rounds']['planned']} planned",
        "- privacy unit: one customer (its data moves each noisy step by at most the clip norm), except at "
        "a merchant whose data has no customer ids (a YooChoose store): there it is one session; each "
        "merchant's ledger records its unit (`privacy unit` below)",
        "- accountant: each merchant's own (`accountant` in its ledger, below): PLD (privacy-loss "
        "distribution, the default) or RDP (Rényi DP), of the Poisson-subsampled Gaussian, composed over "
        "every round and run",
        "",
        f"| {' | '.join(header)} |",
        "|" + "---|" * len(header),
    ]
    for name, m in record["merchants"].items():
        cells = (cell(m.get(c, NOT_REPORTED)) for c in PRIVACY_COLUMNS)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    metrics = record["metrics"]
    lines += [
        "",
        "Each merchant's guarantee is (epsilon, delta)-DP with respect to adding or removing one of its "
        f'privacy units, for everything its adapter updates reveal. "{NOT_REPORTED}": the run folder does '
        "not hold that value.",
        "",
        "Not covered by the guarantee:",
        "",
        *(f"- {item}" for item in record["not_covered"]),
        "",
        f"## Evaluation (round {metrics['round']})",
        "",
        f"Evaluation set: {metrics['evaluation_set']}.",
        "",
        *([metrics["release"], ""] if metrics.get("release") else []),
        *(f"- {line}" for line in metric_lines(metrics.get("values", {}), metrics.get("bands") or {})),
        *exact_markdown(metrics.get("exact")),
    ]
    return lines


def metric_lines(values: Mapping[str, Any], bands: Mapping[str, Any]) -> list[str]:
    """Each metric as people read it: with its noise sd and 95% band ("accuracy 0.750 ± 0.010 (95% band
    0.730 to 0.770)"), why the noise makes it unreadable, or its plain value where the record has no
    band for it. `bands`: a record's `{metric: Band.to_record()}`."""
    found = {k: Band.from_record(v, k) for k, v in bands.items() if isinstance(v, Mapping)}
    return describe_all(values, found, band95=True)


def exact_markdown(exact: Mapping[str, Any] | None) -> list[str]:
    """The exact pooled metrics of a simulation's last round, labelled as such ([] for a deployment)."""
    if not exact:
        return []
    cells = ", ".join(
        f"{name} {exact[key]:.3f}" for key, name in EXACT_NAMES if isinstance(exact.get(key), int | float)
    )
    return [
        "",
        f"Exact pooled metrics of round {exact['round']} (simulation only: its operator holds every "
        f"merchant's local evaluation log, which a deployment never releases): {cells}.",
    ]


def cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, anything else as it is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- a merchant's personalised model --------------------------------------------------------------------


def _score(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _personalised(record: Mapping[str, Any], options: CardOptions) -> list[str]:
    validation, held_out = record.get("validation", {}), record.get("held_out", {})
    rows = [
        f"| {name} | {_score(v.get('auc'))} | {_score(v.get('loss'))} | "
        f"{_score(held_out.get(name, {}).get('auc'))} | {_score(held_out.get(name, {}).get('loss'))} |"
        for name, v in validation.items()
    ]
    customers = ", ".join(f"{k} {v}" for k, v in record.get("customers", {}).items())
    return [
        f"# fedbehavior personalised model: {record['task']['name']}",
        "",
        f"Merchant {record['merchant_id']}'s fine-tune ({record['train']}) of the global model "
        f"`{record['global_folder']}` on its own training customers. Kept: {record['chosen']}; this "
        f"folder's model is the {record['model_in_folder']} one. Metrics: `{options.record_file}`.",
        "",
        "**Not differentially private towards this merchant's customers**: trained without noise on "
        "them. Keep it on the merchant's machines; do not publish it or send it to the coordinator.",
        "",
        *options.loading,
        *([""] if options.loading else []),
        f"## Exact scores on this merchant's customers ({customers or 'no customers recorded'})",
        "",
        "| model | validation AUC | validation loss | held-out AUC | held-out loss |",
        "|---|---|---|---|---|",
        *rows,
    ]
