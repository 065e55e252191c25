"""Personalisation: a merchant fine-tunes the global model on its own training customers, locally.

The global adapter is public to every participant (each merchant receives it every round), so the
merchant keeps the latest one it accepted (`client.evaluation.global_model.save_global`, called from
`client.merchant.evaluate_round`) in `<state_dir>/global/<run>/`, a run's `final/` format. `personalise`
loads it (or any `final/` or export given with `--global`), trains the head (or LoRA + head) on the
merchant's training customers without DP noise, picks the epoch on a validation slice of those training
customers and compares the result there with the global model and the merchant's local-only baseline
(counts logistic regression, `client.evaluation.baseline`). The safe rule: keep the personalised model
only if it beats both on validation, else fall back to the better of them. The three are then scored on the
merchant's held-out customers (the same split as federated training: they never train). The local-only
baseline is also scored out of fold over every training customer (`CV_FOLDS` folds), a steadier
estimate of what the merchant gets alone than either small slice. The metrics are written to
`<state_dir>/personalisation.jsonl` and printed; nothing leaves the merchant.

Not differentially private towards the merchant's own customers: the personalised model, its
validation choice and its metrics depend on every training customer without noise. It never leaves the
merchant, which already holds the data. (A `--dp` option is left out: the epoch choice and the
fallback read exact validation scores, so a DP version would also have to account for those
selections, not just call `train_dp`.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.evaluation.baseline import LogisticRegression, behaviour_counts, cross_validated_probabilities
from client.evaluation.fine_tune import (
    PersonaliseSettings,
    Scores,
    fine_tune,
    start_model,
    trainable_state,
)
from client.evaluation.global_model import latest_global, now, save_model_folder
from client.ingest.data import Encoder, MerchantData, load_merchant_data
from client.ingest.encoded import Encoded
from client.settings import MerchantSettings
from client.training.loop import predict
from shared.config import MerchantPlan
from shared.fileio import atomic_write_json
from shared.metrics import AucDifference, paired_auc_difference
from shared.model import load_tokenizer, resolve_device
from shared.model_card import PERSONALISED, CardOptions, render_card
from shared.tasks import Candidate, one_per_customer, split_customers, up_to_k_per_customer

log = logging.getLogger(__name__)

REPORT_FILE = "personalisation.json"
LOCAL_ONLY_FILE = "local-only.json"
STATE_LOG = "personalisation.jsonl"
LOCAL, GLOBAL, PERSONAL = "local-only", "global", "personalised"
KEPT = "kept"  # the model the safe rule chose

CV_FOLDS = 5


def choose(validation: Mapping[str, Scores]) -> str:
    """The safe rule: the personalised model only if it beats both the global model and the
    local-only baseline on validation, else the better of those two (ties favour the global one)."""
    mine, others = validation[PERSONAL], (validation[GLOBAL], validation[LOCAL])
    if all(mine.key() > other.key() for other in others):
        return PERSONAL
    return GLOBAL if validation[GLOBAL].key() >= validation[LOCAL].key() else LOCAL


# --- the examples -------------------------------------------------------------------------------------


@dataclass
class Split:
    """The merchant's examples for personalisation: fit and validation slices of its training
    customers, and its held-out customers (never trained on)."""

    fit: list[Candidate]
    validation: list[Candidate]
    held_out: list[Candidate]
    baseline_train: list[Candidate]  # one per training customer, as the merchant's baseline uses

    @classmethod
    def of(cls, data: MerchantData, settings: PersonaliseSettings, salt: str) -> Split:
        fit_ids, val_ids = split_customers(
            data.train_customers, eval_fraction=settings.validation_fraction, salt=f"{salt}:personalise"
        )
        if not fit_ids or not val_ids:
            raise ValueError(
                f"{len(data.train_customers)} training customers are too few to keep a validation slice "
                f"(--validation-fraction {settings.validation_fraction}); add data or change it"
            )
        fit = up_to_k_per_customer(
            data.train_candidates, fit_ids, k=settings.examples_per_customer, round_seed="personalise"
        )
        return cls(
            fit=fit,
            validation=one_per_customer(data.train_candidates, val_ids, round_seed="validation"),
            held_out=data.evaluation(),
            baseline_train=one_per_customer(
                data.train_candidates, data.train_customers, round_seed="baseline"
            ),
        )


def _labels(candidates: list[Candidate]) -> np.ndarray:
    return np.asarray([c.label for c in candidates], dtype=np.int64)


# --- the whole step ---------------------------------------------------------------------------------


@dataclass
class PersonaliseReport:
    """What `personalise` did and measured. Exact, local: written to the state folder, never sent."""

    merchant_id: str
    train: str
    chosen: str  # personalised | global | local-only (the fallback rule on validation)
    model_in_folder: str  # personalised | global: the better BERT model, what predict scores with
    best_epoch: int
    customers: dict[str, int]
    validation: dict[str, Scores]
    held_out: dict[str, Scores]
    # the local-only regression's out-of-fold scores over every training customer (`CV_FOLDS` folds):
    # what it scores on customers it did not fit, on about 5x the validation slice's customers
    local_cross_validated: Scores | None
    # held-out AUC of the global and of the kept model minus the local-only one's, with a 95% paired
    # bootstrap interval over the held-out customers (binary tasks): "does joining help me?", and how
    # sure the held-out set can make the merchant of it
    gain_over_local: dict[str, AucDifference | None]
    history: list[dict[str, float | None]]
    global_folder: str
    out: str
    created_at: str = field(default_factory=now)
    # the customers each slice used (for checks in Python; never written anywhere)
    fit_ids: frozenset[str] = frozenset()
    validation_ids: frozenset[str] = frozenset()
    held_out_ids: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        for key in ("fit_ids", "validation_ids", "held_out_ids"):
            record.pop(key)
        return record

    def lines(self) -> list[str]:
        """The console table: held-out AUC and loss of each model, and what was kept."""
        rows = [f"merchant {self.merchant_id}: {self.customers}"]
        rows.append(f"{'':14}{'validation AUC':>16}{'loss':>8}{'held-out AUC':>15}{'loss':>8}")
        for name in (LOCAL, GLOBAL, PERSONAL):
            v, h = self.validation[name], self.held_out[name]
            rows.append(f"{name:14}{_fmt(v.auc):>16}{v.loss:8.4f}{_fmt(h.auc):>15}{h.loss:8.4f}")
        if self.local_cross_validated is not None:
            cv = self.local_cross_validated
            rows.append(
                f"{LOCAL}, {CV_FOLDS}-fold on its {cv.examples} training customers: AUC {_fmt(cv.auc)}, "
                f"loss {cv.loss:.4f}"
            )
        gains = {name: gain for name, gain in self.gain_over_local.items() if gain is not None}
        if gains:
            level = next(iter(gains.values())).level
            rows.append(
                "held-out AUC minus local-only's ["
                + f"{level:.0%} paired bootstrap over held-out customers]: "
                + ", ".join(f"{name} {gain}" for name, gain in gains.items())
            )
        if self.chosen == PERSONAL:
            rows.append(f"kept: the personalised model (best epoch {self.best_epoch})")
        else:
            rows.append(
                f"kept: {self.chosen} (fallback: personalisation did not beat both the global model and "
                "the local-only baseline on validation)"
            )
        if self.chosen == LOCAL:
            rows.append(
                f"the folder's model for predict is the {self.model_in_folder} one; the local-only "
                f"counts model is in {LOCAL_ONLY_FILE}"
            )
        return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def personalise(
    merchant_dir: Path,
    *,
    out: Path,
    global_folder: Path | None = None,
    settings: PersonaliseSettings | None = None,
    merchant: MerchantSettings | None = None,
) -> PersonaliseReport:
    """Fine-tune the global model on this merchant's training customers and write the kept model
    to `out` (a run's `final/` format: `fedbehavior predict --model <out>` reads it)."""
    settings = settings or PersonaliseSettings()
    merchant = merchant or MerchantSettings.from_merchant_dir(Path(merchant_dir))
    source = Path(global_folder) if global_folder is not None else latest_global(merchant.state_dir)
    device = resolve_device(settings.device)
    model, cfg, backbone = start_model(source, settings.train, device)
    data = load_merchant_data(
        merchant.data_dir,
        merchant.state_dir,
        cfg.task_spec,
        eval_fraction=merchant.eval_fraction,
        salt=merchant.merchant_id,  # the salt of federated training: the same held-out customers
        split=cfg.eval_split,
        cutoff=cfg.eval_cutoff_time,
    )
    split = Split.of(data, settings, merchant.merchant_id)
    encoder = Encoder(load_tokenizer(backbone), cfg.max_length)
    fit, val, held = (encoder.encode(s) for s in (split.fit, split.validation, split.held_out))
    num_labels = cfg.task_spec.num_labels

    held_labels = _labels(split.held_out)
    held_probs: dict[str, np.ndarray] = {}  # each model's held-out probabilities, for the gain intervals

    def scores(x: Encoded, candidates: list[Candidate]) -> Scores:
        return Scores.of(_labels(candidates), predict(model, x, batch_size=128, device=device)[0])

    def held_scores(name: str) -> Scores:
        held_probs[name] = predict(model, held, batch_size=128, device=device)[0]
        return Scores.of(held_labels, held_probs[name])

    global_state = trainable_state(model)
    validation, held_out = {GLOBAL: scores(val, split.validation)}, {GLOBAL: held_scores(GLOBAL)}
    fitted = fine_tune(model, fit, val, settings, device)
    validation[PERSONAL], held_out[PERSONAL] = scores(val, split.validation), held_scores(PERSONAL)
    # local-only: compared on validation fitted on the fit customers, reported fitted on all training ones
    fit_one = one_per_customer(
        data.train_candidates, {c.customer_id for c in split.fit}, round_seed="baseline"
    )
    local_val = LogisticRegression.fit(behaviour_counts(fit_one), _labels(fit_one), num_classes=num_labels)
    validation[LOCAL] = Scores.of(
        _labels(split.validation), local_val.predict_proba(behaviour_counts(split.validation))
    )
    local = LogisticRegression.fit(
        behaviour_counts(split.baseline_train), _labels(split.baseline_train), num_classes=num_labels
    )
    held_probs[LOCAL] = local.predict_proba(behaviour_counts(split.held_out))
    held_out[LOCAL] = Scores.of(held_labels, held_probs[LOCAL])
    local_cv = (
        Scores.of(
            _labels(split.baseline_train),
            cross_validated_probabilities(
                split.baseline_train, num_labels, folds=CV_FOLDS, salt=merchant.merchant_id
            ),
        )
        if len(split.baseline_train) >= CV_FOLDS
        else None
    )
    chosen = choose(validation)
    gain_over_local = {
        name: paired_auc_difference(held_labels, held_probs[model_name][:, 1], held_probs[LOCAL][:, 1])
        if num_labels == 2
        else None
        for name, model_name in ((GLOBAL, GLOBAL), (KEPT, chosen))
    }
    in_folder = PERSONAL if validation[PERSONAL].key() > validation[GLOBAL].key() else GLOBAL
    if in_folder == GLOBAL:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in global_state.items():
                params[name].copy_(value)
    report = PersonaliseReport(
        merchant_id=merchant.merchant_id,
        train=settings.train,
        chosen=chosen,
        model_in_folder=in_folder,
        best_epoch=fitted.best_epoch,
        customers={
            "fit": len({c.customer_id for c in split.fit}),
            "validation": len(split.validation),
            "held_out": len(split.held_out),
        },
        validation=validation,
        held_out=held_out,
        local_cross_validated=local_cv,
        gain_over_local=gain_over_local,
        history=fitted.history,
        global_folder=str(source),
        out=str(out),
        fit_ids=frozenset(c.customer_id for c in split.fit),
        validation_ids=frozenset(c.customer_id for c in split.validation),
        held_out_ids=frozenset(c.customer_id for c in split.held_out),
    )
    _write_out(Path(out), model, cfg, report, local if chosen == LOCAL else None)
    merchant.state_dir.mkdir(parents=True, exist_ok=True)
    with (merchant.state_dir / STATE_LOG).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(report.to_json()) + "\n")
    return report


def _write_out(
    out: Path,
    model: torch.nn.Module,
    cfg: MerchantPlan,
    report: PersonaliseReport,
    local: LogisticRegression | None,
) -> None:
    """Stage the whole folder beside `out`, then put it in place: `out` is never half written.
    Refuses to replace a non-empty folder that is not an earlier personalisation."""
    if out.exists() and any(out.iterdir()) and not (out / REPORT_FILE).exists():
        raise FileExistsError(
            f"--out {out} exists and holds something else; remove it or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        save_model_folder(model, staged, cfg)
        atomic_write_json(staged / REPORT_FILE, report.to_json())
        if local is not None:
            atomic_write_json(
                staged / LOCAL_ONLY_FILE,
                {
                    "features": "client.evaluation.baseline.behaviour_counts",
                    "weights": local.weights.tolist(),
                },
            )
        (staged / "README.md").write_text(
            render_card(
                report.to_json()
                | {"task": {"name": cfg.task_spec.name, "labels": list(cfg.task_spec.labels)}},
                CardOptions(
                    kind=PERSONALISED,
                    record_file=REPORT_FILE,
                    loading=(
                        "Load it like a run's `final/`: `fedbehavior predict --model this_folder ...`.",
                    ),
                ),
            ),
            encoding="utf-8",
        )
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


# --- command line -----------------------------------------------------------------------------------


def cmd_personalise(args: argparse.Namespace) -> int:
    settings = PersonaliseSettings(
        train=args.train,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        lora_learning_rate=args.lora_learning_rate,
        batch_size=args.batch_size,
        validation_fraction=args.validation_fraction,
        device=args.device,
    )
    report = personalise(
        Path(args.merchant_dir),
        out=Path(args.out),
        global_folder=Path(args.global_folder) if args.global_folder else None,
        settings=settings,
    )
    print("\n".join(report.lines()))
    print(f"written to {args.out}; metrics appended to the merchant's state folder ({STATE_LOG})")
    return 0
