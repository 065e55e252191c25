"""One merchant's side of a round, as plain functions: no Flower here.

`train_round` = admit the message (policy, pinned plan, caps; `client.training.budget`) → check the incoming
adapter against public bounds → read the data → public size → charge → DP-SGD → outgoing guard.
`evaluate_round` = admit → check the adapter → charge → held-out customers → noisy histograms
(`client.evaluation.release`; exact metrics never leave). Everything that decides whether and how a message
is answered happens before the data is read; after it, the reply is the release. Heavy objects
(model, tokenizer, encoded data) are cached per process: a Flower ClientApp is rebuilt for every
message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from client.evaluation.baseline import baseline_probabilities
from client.evaluation.global_model import save_global
from client.evaluation.release import HeldOut, exact_metrics, log_locally, noisy_histograms
from client.ingest.data import Encoder, MerchantData, load_merchant_data
from client.settings import MerchantSettings
from client.training import budget as budgets
from client.training.budget import Budget, Refusal, RunRecord
from client.training.feature_cache import FeatureCache, open_cache
from client.training.loop import DPSettings, TrainSettings, customer_groups, predict, train_dp
from shared.adapters import AdapterSpec, AdapterState, extract_adapter, load_adapter, outgoing_guard
from shared.config import MerchantPlan
from shared.histograms import LOCAL_BASELINE, MODEL, Histogram
from shared.model import build_model, load_tokenizer, resolve_backbone, resolve_device
from shared.model_spec import LoraSpec, Pooling
from shared.privacy import Ledger
from shared.protocol import Reason, Status
from shared.tasks import TaskSpec, one_per_customer

log = logging.getLogger(__name__)

TRAINED, REFUSED_BUDGET, FAILED = Status.TRAINED.value, Status.REFUSED.value, Status.FAILED.value
EVALUATED = Status.EVALUATED.value
BUDGET, CALIBRATION, NON_FINITE = Reason.BUDGET.value, Reason.CALIBRATION.value, Reason.NON_FINITE.value
BAD_REQUEST, ERROR = Reason.BAD_REQUEST.value, Reason.ERROR.value
EVALUATION_LIMIT = Reason.EVALUATION_LIMIT.value
WIRE_REASONS = frozenset(r.value for r in Reason)


@dataclass
class RoundOutcome:
    """What a merchant reports after a training round. `adapter` is None unless status is trained.
    `examples` is the run's public training size, never the exact count."""

    status: str
    merchant_id: str
    epsilon: float
    delta: float
    examples: int = 0
    adapter: AdapterState | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # the local explanation: logged on the merchant, never sent
    code: str = ""  # the fixed short reason (one of WIRE_REASONS) that the reply carries
    privacy: dict[str, str] = field(default_factory=dict)  # public DP parameters (`ledger_parameters`)
    local: dict[str, float] = field(default_factory=dict)  # exact figures for the merchant's own log


def ledger_parameters(ledger: Ledger) -> dict[str, str]:
    """The ledger's accountant and privacy unit, for the coordinator's provenance record: settings of
    the merchant and a property of its data source (customer ids or not), never a count or a value."""
    return {"accountant": ledger.accountant, "privacy-unit": ledger.privacy_unit}


@lru_cache(maxsize=2)
def cached_model(
    backbone: str, num_labels: int, lora: LoraSpec, pooling: Pooling, device: str
) -> torch.nn.Module:
    log.info("building model %s on %s (once per process)", backbone, device)
    return build_model(backbone, num_labels=num_labels, lora=lora, device=device, pooling=pooling)


@lru_cache(maxsize=2)
def cached_encoder(backbone: str, max_length: int) -> Encoder:
    return Encoder(load_tokenizer(backbone), max_length)


@lru_cache(maxsize=4)
def cached_data(
    data_dir: Path,
    state_dir: Path,
    task: TaskSpec,
    eval_fraction: float,
    salt: str,
    split: str,
    cutoff: datetime | None = None,
) -> MerchantData:
    # require_both=False: an empty training or held-out set (a time split's cut-off, a rare task) is
    # answered with the release (noise-only steps, a noisy empty histogram), never with a failure
    data = load_merchant_data(
        data_dir,
        state_dir,
        task,
        eval_fraction=eval_fraction,
        salt=salt,
        split=split,
        cutoff=cutoff,
        require_both=False,
    )
    report = data.load_report
    log.info(
        "%s: %d events (%d quarantined), %d train / %d held-out customers",
        salt,
        report.good,
        report.quarantined,
        len(data.train_customers),
        len(data.eval_customers),
    )
    return data


def _model(settings: MerchantSettings, cfg: MerchantPlan) -> tuple[torch.nn.Module, Encoder, torch.device]:
    """The model and encoder of the plan: public inputs only (no customer data is read here)."""
    device = resolve_device(settings.device)
    backbone = resolve_backbone(cfg.backbone)
    model = cached_model(backbone, cfg.task_spec.num_labels, cfg.lora, cfg.pooling, str(device))
    return model, cached_encoder(backbone, cfg.max_length), device


def feature_cache(settings: MerchantSettings) -> FeatureCache | None:
    """The merchant's head-mode feature cache (its private state; None when feature-cache-mb is 0)."""
    return open_cache(settings.feature_cache_dir, settings.feature_cache_mb)


def _data(settings: MerchantSettings, cfg: MerchantPlan) -> MerchantData:
    return cached_data(
        settings.data_dir,
        settings.state_dir,
        cfg.task_spec,
        settings.eval_fraction,
        settings.merchant_id,
        cfg.eval_split,
        cfg.eval_cutoff_time,
    )


def _prepare(
    settings: MerchantSettings, cfg: MerchantPlan
) -> tuple[torch.nn.Module, Encoder, MerchantData, torch.device]:
    model, encoder, device = _model(settings, cfg)
    return model, encoder, _data(settings, cfg), device


def privacy_unit(settings: MerchantSettings) -> str:
    """A session for stores ingested from sources without customer ids (YooChoose), else a customer."""
    from client.ingest.store import REPORT_FILE
    from shared.privacy.units import unit_of_ingest_report

    return unit_of_ingest_report(settings.data_dir / REPORT_FILE)


def open_ledger(settings: MerchantSettings) -> Ledger:
    """The merchant's ledger, with its own accountant and the privacy unit of its data."""
    return settings.open_ledger(privacy_unit(settings))


def _admit(
    settings: MerchantSettings, cfg: MerchantPlan, adapter: AdapterState, run_id: str
) -> tuple[Budget, RunRecord, torch.nn.Module, Encoder, torch.device]:
    """Everything decided before the data is read: the run record (policy, pinned plan, caps) and
    the incoming adapter's public bounds. Raises `Refusal`; nothing is charged here."""
    budget = Budget.open(settings, privacy_unit(settings))
    with budget.locked():
        record = budget.admit(cfg, run_id)
    try:
        model, encoder, device = _model(settings, cfg)
    except Exception as err:  # public inputs only (the plan, an approved backbone): no data read yet
        raise budgets.bad_request(f"the plan's model cannot be built: {type(err).__name__}: {err}") from err
    problem = budgets.incoming_problem(model, adapter, settings.policy.max_adapter_norm)
    if problem is not None:
        raise budgets.bad_request(problem)
    return budget, record, model, encoder, device


def train_round(
    settings: MerchantSettings,
    cfg: MerchantPlan,
    adapter: AdapterState,
    *,
    server_round: int,
    run_id: str,
    seed: int | None = None,
) -> RoundOutcome:
    """Train the global adapter on this merchant's customers with customer-level DP-SGD, charging
    the ledger first. Whether and how it trains is decided from public inputs only; `seed` is for
    tests only."""
    try:
        budget, record, model, encoder, device = _admit(settings, cfg, adapter, run_id)
    except Refusal as refusal:
        return _refused(RoundOutcome, settings, refusal, server_round)
    data = _data(settings, cfg)  # private from here on
    chosen = data.train_round(f"{run_id}:{server_round}", cfg.examples_per_customer)
    try:
        with budget.locked():
            record = budget.book.find(run_id) or record
            size = budgets.public_size(
                budget, record, len(data.train_customers), server_round=server_round, seed=seed
            )
            plan, sigma = budgets.training_charge(budget, record, cfg, server_round, size)
    except Refusal as refusal:
        return _refused(RoundOutcome, settings, refusal, server_round, budget.ledger)
    # From here on the spend is on disk: whatever happens next, it stays charged.
    load_adapter(model, adapter)
    spec = AdapterSpec.of(model)
    result = train_dp(
        model,
        encoder.encode(chosen),
        settings=TrainSettings(
            epochs=plan.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            lora_learning_rate=cfg.lora_learning_rate or None,
            planned_customers=plan.customers,
            feature_runtime=settings.feature_runtime,
        ),
        dp=DPSettings(noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm),
        device=device,
        groups=customer_groups([c.customer_id for c in chosen]),
        seed=seed,
        feature_cache=feature_cache(settings),
    )
    if (result.sample_rate, result.steps) != (plan.sample_rate, plan.steps):  # a bug, never data
        raise RuntimeError(f"DP-SGD ran {result} but the ledger was charged for {plan}")
    ledger = budget.ledger
    local = {
        "train_loss": result.loss,
        "customers": float(result.customers),
        "examples": float(result.examples),
    }
    log.info("%s round %d (run %s): %s", settings.merchant_id, server_round, record.record_id, local)
    update = outgoing_guard(extract_adapter(model), spec)
    # The weights are post-processing of the noisy steps (each customer's non-finite gradient was
    # zeroed before clipping), so whether they are finite is itself a DP release.
    if not all(bool(torch.isfinite(t).all()) for t in update.values()):
        detail = "training produced non-finite weights; lower learning-rate"
        log.warning("%s fails round %d: %s", settings.merchant_id, server_round, detail)
        return RoundOutcome(
            FAILED, settings.merchant_id, ledger.epsilon, ledger.delta, reason=detail, code=NON_FINITE
        )
    return RoundOutcome(
        TRAINED,
        settings.merchant_id,
        ledger.epsilon,
        ledger.delta,
        examples=plan.customers,
        adapter=update,
        metrics={
            # the round's charge as written to the ledger, all from the public size and the plan
            "noise_multiplier": sigma,
            "sample_rate": plan.sample_rate,
            "steps": float(plan.steps),
            "max_epsilon": ledger.max_epsilon,  # the merchant's own budget setting
        },
        privacy=ledger_parameters(ledger),
        local=local,
    )


Outcome = TypeVar("Outcome", "RoundOutcome", "EvalOutcome")


def _refused(
    kind: type[Outcome],
    settings: MerchantSettings,
    refusal: Refusal,
    server_round: int,
    ledger: Ledger | None = None,
) -> Outcome:
    """The outcome of a message the merchant does not answer with a release: its status, its fixed
    reason for the wire, and the detail for the merchant's own log."""
    ledger = ledger or open_ledger(settings)
    log.warning(
        "%s answers round %d with %s: %s",
        settings.merchant_id,
        server_round,
        refusal.reason.value,
        refusal.detail,
    )
    return kind(
        refusal.status.value,
        settings.merchant_id,
        ledger.epsilon,
        ledger.delta,
        reason=refusal.detail,
        code=refusal.reason.value,
    )


@dataclass
class EvalOutcome:
    """What a merchant reports after an evaluation: noisy histograms (charged) and its epsilon."""

    status: str
    merchant_id: str
    epsilon: float
    delta: float
    histograms: dict[str, Histogram] = field(default_factory=dict)
    reason: str = ""  # logged on the merchant, never sent
    code: str = ""  # one of WIRE_REASONS

    @property
    def examples(self) -> int:
        """The noisy held-out count (post-processing of the model's noisy histogram)."""
        model = self.histograms.get(MODEL)
        return max(0, round(model.examples)) if model is not None else 0


def keep_global(
    settings: MerchantSettings, model: torch.nn.Module, cfg: MerchantPlan, *, run_id: str, server_round: int
) -> None:
    """Keep the accepted global adapter (loaded in `model`) for personalisation, in
    `<state_dir>/global/`. Every participant receives it, so keeping it releases nothing."""
    try:
        save_global(settings.state_dir, model, cfg, run_id=run_id, server_round=server_round)
    except OSError as err:  # a full disk must not fail the round
        log.warning("%s could not keep the global adapter: %s", settings.merchant_id, err)


def evaluate_round(
    settings: MerchantSettings,
    cfg: MerchantPlan,
    adapter: AdapterState,
    *,
    server_round: int = 0,
    run_id: str = "",
    seed: int | None = None,
) -> EvalOutcome:
    """Noisy histograms of `adapter` (and once per run of the local baseline) on this merchant's
    held-out customers, charged to the ledger first; released even when the held-out set is empty.
    `seed` is for tests only."""
    try:
        budget, record, model, encoder, device = _admit(settings, cfg, adapter, run_id)
        with budget.locked():
            record = budget.book.find(run_id) or record
            with_baseline = budgets.evaluation_charge(budget, record, server_round)
    except Refusal as refusal:
        return _refused(EvalOutcome, settings, refusal, server_round)
    ledger = budget.ledger
    load_adapter(model, adapter)
    keep_global(settings, model, cfg, run_id=run_id, server_round=server_round)
    data = _data(settings, cfg)  # private from here on
    held_out = data.evaluation()
    probs, _ = predict(
        model,
        encoder.encode(held_out),
        batch_size=max(cfg.batch_size, 64),
        device=device,
        feature_cache=feature_cache(settings),
        feature_runtime=settings.feature_runtime,
    )
    labels = np.asarray([c.label for c in held_out], dtype=np.int64)
    results = {MODEL: HeldOut(labels, probs)}
    private: dict[str, HeldOut] = {}  # for the merchant's own log only
    if with_baseline:
        train = one_per_customer(data.train_candidates, data.train_customers, round_seed="baseline")
        noisy, exact = baseline_probabilities(
            train,
            held_out,
            cfg.task_spec.num_labels,
            noise_multiplier=settings.eval_noise_multiplier,
            seed=seed,
        )
        results[LOCAL_BASELINE] = HeldOut(labels, noisy)
        private[f"{LOCAL_BASELINE}_nonprivate"] = HeldOut(labels, exact)
    log_record = {"run_id": run_id, "round": server_round, **exact_metrics({**results, **private})}
    log_locally(settings.state_dir, log_record)
    histograms = noisy_histograms(results, settings.eval_noise_multiplier, seed=seed)
    return EvalOutcome(EVALUATED, settings.merchant_id, ledger.epsilon, ledger.delta, histograms)
