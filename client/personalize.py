"""Personalisation: a merchant fine-tunes the global model on its own training customers, locally.

The global adapter is public to every participant (each merchant receives it every round), so the
merchant keeps the latest one it accepted (`client.global_model.save_global`, called from
`client.merchant.evaluate_round`) in `<state_dir>/global/<run>/`, a run's `final/` format. `personalize`
loads it (or any `final/` or export given with `--global`), trains the head (or LoRA + head) on the
merchant's training customers without DP noise, picks the epoch on a validation slice of those training
customers and compares the result there with the global model and the merchant's local-only baseline
(counts logistic regression, `client.baseline`). The safe rule: keep the personalised model only if it
beats both on validation, else fall back to the better of them. The three are then scored on the
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
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.baseline import LogisticRegression, behaviour_counts, cross_validated_probabilities
from client.data import Encoder, MerchantData, load_merchant_data
from client.encoded import Encoded
from client.global_model import latest_global, now, save_model_folder
from client.settings import MerchantSettings
from client.train import TrainSettings, make_optimizer, predict
from shared.adapters import load_adapter
from shared.config import RunConfig
from shared.fileio import atomic_write_json
from shared.metrics import AucDifference, paired_auc_difference, roc_auc
from shared.model import build_model, freeze_for, load_tokenizer, resolve_backbone, resolve_device
from shared.tasks import Candidate, one_per_customer, split_customers, up_to_k_per_customer
from shared.trained import ADAPTER_CONFIG, read_run_config

log = logging.getLogger(__name__)

REPORT_FILE = "personalisation.json"
LOCAL_ONLY_FILE = "local-only.json"
STATE_LOG = "personalisation.jsonl"
LOCAL, GLOBAL, PERSONAL = "local-only", "global", "personalised"
KEPT = "kept"  # the model the safe rule chose
TRAIN_MODES = ("head", "lora+head")
CV_FOLDS = 5


# --- settings and scores ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PersonaliseSettings:
    """How the merchant fine-tunes. Every field is a local choice; none is sent anywhere."""

    train: str = "head"  # "head" (LoRA kept as received) or "lora+head"
    epochs: int = 20  # the most; the epoch kept is the best on validation
    patience: int = 4  # stop after this many epochs without a better validation score
    learning_rate: float = 0.01  # the head's AdamW rate
    lora_learning_rate: float = 0.001
    batch_size: int = 32
    validation_fraction: float = 0.2  # of the *training* customers: the held-out ones never train
    examples_per_customer: int = 4  # sessions per training customer (validation: one, like held-out)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1 or self.examples_per_customer < 1:
            raise ValueError("--epochs, patience, --batch-size and examples per customer must be ≥ 1")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation-fraction must be in (0, 1), got {self.validation_fraction}")
        if self.learning_rate <= 0 or self.lora_learning_rate <= 0:
            raise ValueError("--learning-rate and --lora-learning-rate must be positive")


@dataclass(frozen=True)
class Scores:
    """AUC (binary tasks with both labels present, else None) and mean log loss."""

    auc: float | None
    loss: float
    examples: int

    @classmethod
    def of(cls, labels: np.ndarray, probs: np.ndarray) -> Scores:
        picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
        auc = roc_auc(labels, probs[:, 1]) if probs.shape[1] == 2 else None
        return cls(auc, float(-np.log(picked).mean()), len(labels))

    def key(self) -> tuple[float, float]:
        """Larger is better: AUC first where there is one (the goal's metric), then lower loss."""
        return (self.auc if self.auc is not None else -math.inf, -self.loss)


def choose(validation: Mapping[str, Scores]) -> str:
    """The safe rule: the personalised model only if it beats both the global model and the
    local-only baseline on validation, else the better of those two (ties favour the global one)."""
    mine, others = validation[PERSONAL], (validation[GLOBAL], validation[LOCAL])
    if all(mine.key() > other.key() for other in others):
        return PERSONAL
    return GLOBAL if validation[GLOBAL].key() >= validation[LOCAL].key() else LOCAL


# --- the starting model -----------------------------------------------------------------------------


def start_model(folder: Path, mode: str, device: torch.device) -> tuple[torch.nn.Module, RunConfig, str]:
    """The global model, trainable as `mode` asks: (model, run config, backbone). A run's `final/`
    loads as its backbone + adapter; an export becomes the backbone of a fresh LoRA adapter (B = 0:
    the same function), so the result is a `final/` over the export folder."""
    folder = Path(folder)
    if (folder / "final" / ADAPTER_CONFIG).exists():
        folder = folder / "final"
    if not folder.is_dir() or not any(folder.glob("*.json")):
        raise FileNotFoundError(
            f"--global {folder} is not a model folder: pass a run's final/, an export, or omit it to use "
            "the global model this merchant kept (<state_dir>/global/latest.json)"
        )
    cfg = read_run_config(folder)
    exported = not (folder / ADAPTER_CONFIG).exists()
    backbone = str(folder.resolve()) if exported else resolve_backbone(cfg.backbone)
    # every LoRA tensor in the spec, so the saved adapter loads whole; frozen below as `mode` asks
    full = replace(cfg.lora, trainable="lora+head", mode="lora")
    model = build_model(
        backbone, num_labels=cfg.task_spec.num_labels, lora=full, device=device, pooling=cfg.pooling
    )
    if not exported:
        from safetensors.torch import load_file

        load_adapter(model, load_file(str(folder / "adapter_model.safetensors")))
    freeze_for(model, replace(full, trainable=mode))
    return model, cfg.model_copy(update={"backbone": backbone}), backbone


# --- training ---------------------------------------------------------------------------------------


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


def _head(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_submodule("base_model.model.classifier")
    return head


@torch.no_grad()
def head_inputs(
    model: torch.nn.Module, data: Encoded, device: torch.device, batch: int = 128
) -> torch.Tensor:
    """What the classifier head reads for every example (the pooled vector): with the backbone and
    LoRA frozen, head-only training needs the backbone once, not once per epoch."""
    captured: list[torch.Tensor] = []
    hook = _head(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().cpu()))
    try:
        model.eval()
        for start in range(0, len(data), batch):
            sl = slice(start, start + batch)
            model(**data.inputs(sl, device))
    finally:
        hook.remove()
    return torch.cat(captured) if captured else torch.zeros(0)


@dataclass
class Fitted:
    """The trained model's best epoch and the validation score after every epoch (0 = the global)."""

    best_epoch: int
    history: list[dict[str, float | None]] = field(default_factory=list)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fine_tune(
    model: torch.nn.Module,
    fit: Encoded,
    validation: Encoded,
    settings: PersonaliseSettings,
    device: torch.device,
) -> Fitted:
    """Plain (non-DP) AdamW on `fit`, early-stopped on `validation`; `model` ends at its best epoch."""
    head_only = settings.train == "head"
    if head_only:  # the head is linear in what it reads: train it on cached inputs
        fit_x, val_x = head_inputs(model, fit, device), head_inputs(model, validation, device)
    optimizer = make_optimizer(
        model,
        TrainSettings(learning_rate=settings.learning_rate, lora_learning_rate=settings.lora_learning_rate),
    )
    generator = torch.Generator().manual_seed(settings.seed)
    val_labels = validation.labels.numpy()

    def validate() -> Scores:
        if head_only:
            with torch.no_grad():
                _head(model).eval()
                probs = torch.softmax(_head(model)(val_x.to(device)).float(), dim=-1).cpu().numpy()
            return Scores.of(val_labels, probs)
        return Scores.of(val_labels, predict(model, validation, batch_size=128, device=device)[0])

    best, best_state, fitted = validate(), _trainable_state(model), Fitted(0)
    fitted.history.append({"epoch": 0, "auc": best.auc, "loss": best.loss})
    for epoch in range(1, settings.epochs + 1):
        model.train()
        for rows in torch.randperm(len(fit), generator=generator).split(settings.batch_size):
            labels = fit.labels[rows].to(device)
            if head_only:
                logits = _head(model)(fit_x[rows].to(device))
            else:
                logits = model(**fit.inputs(rows, device)).logits
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        score = validate()
        fitted.history.append({"epoch": epoch, "auc": score.auc, "loss": score.loss})
        if score.key() > best.key():
            best, best_state, fitted.best_epoch = score, _trainable_state(model), epoch
        elif epoch - fitted.best_epoch >= settings.patience:
            break
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in best_state.items():
            params[name].copy_(value)
    model.eval()
    return fitted


# --- the whole step ---------------------------------------------------------------------------------


@dataclass
class PersonaliseReport:
    """What `personalize` did and measured. Exact, local: written to the state folder, never sent."""

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


def personalize(
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

    global_state = _trainable_state(model)
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
    cfg: RunConfig,
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
                {"features": "client.baseline.behaviour_counts", "weights": local.weights.tolist()},
            )
        (staged / "README.md").write_text(model_card(cfg, report), encoding="utf-8")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def model_card(cfg: RunConfig, report: PersonaliseReport) -> str:
    return "\n".join(
        [
            f"# fedbehavior personalised model: {cfg.task_spec.name}",
            "",
            f"Merchant {report.merchant_id}'s fine-tune ({report.train}) of the global model "
            f"`{report.global_folder}` on its own training customers. Kept: {report.chosen}; this folder's "
            f"model is the {report.model_in_folder} one. Metrics: `{REPORT_FILE}`.",
            "",
            "**Not differentially private towards this merchant's customers**: trained without noise on "
            "them. Keep it on the merchant's machines; do not publish it or send it to the coordinator.",
            "",
        ]
    )


# --- command line -----------------------------------------------------------------------------------


def cmd_personalize(args: argparse.Namespace) -> int:
    settings = PersonaliseSettings(
        train=args.train,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        lora_learning_rate=args.lora_learning_rate,
        batch_size=args.batch_size,
        validation_fraction=args.validation_fraction,
        device=args.device,
    )
    report = personalize(
        Path(args.merchant_dir),
        out=Path(args.out),
        global_folder=Path(args.global_folder) if args.global_folder else None,
        settings=settings,
    )
    print("\n".join(report.lines()))
    print(f"written to {args.out}; metrics appended to the merchant's state folder ({STATE_LOG})")
    return 0


def add_personalize_cli(merchant_subparsers: Any) -> argparse.ArgumentParser:
    """Register `fedbehavior merchant personalize` on the `merchant` subparsers."""
    defaults = PersonaliseSettings()
    parser: argparse.ArgumentParser = merchant_subparsers.add_parser(
        "personalize",
        help="fine-tune the global model on your own customers (local, not DP towards them)",
    )
    parser.add_argument("merchant_dir")
    parser.add_argument(
        "--global",
        dest="global_folder",
        default="",
        help="a run's final/ or an export (default: the global model this merchant kept last)",
    )
    parser.add_argument("--train", choices=TRAIN_MODES, default=defaults.train)
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="at most; early-stopped")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--lora-learning-rate", type=float, default=defaults.lora_learning_rate)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--out", required=True, help="the personalised model folder (final/ format)")
    parser.set_defaults(func=cmd_personalize)
    return parser
