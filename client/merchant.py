"""One merchant's side of a round, as plain functions: no Flower here.

`train_round` = load data → pick this round's customers → calibrate noise → charge the ledger →
DP-SGD → outgoing guard. `evaluate_round` = held-out customers → charge the ledger → noisy
histograms (`client.evaluation`; exact metrics never leave). Heavy objects (model,
tokenizer, encoded data) are cached per process: a Flower ClientApp is rebuilt for every message.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from client.baseline import baseline_probabilities
from client.data import Encoder, MerchantData, load_merchant_data
from client.evaluation import (
    BASELINE_RELEASES,
    EvaluationCounter,
    HeldOut,
    exact_metrics,
    log_locally,
    noisy_histograms,
    planned_charges,
    release_charge,
)
from client.global_model import save_global
from client.round_checks import check_run_cap, delta_problem, incoming_problem, run_epsilon_target
from client.settings import MerchantSettings
from client.train import DPSettings, StepPlan, TrainSettings, customer_groups, predict, train_dp
from shared.adapters import AdapterSpec, AdapterState, extract_adapter, load_adapter, outgoing_guard
from shared.config import RunConfig
from shared.histograms import LOCAL_BASELINE, MODEL, Histogram
from shared.model import LoraSpec, build_model, load_tokenizer, resolve_backbone, resolve_device
from shared.privacy import BudgetExceededError, Charge, Ledger
from shared.privacy.calibration import CalibrationError, calibrate_noise
from shared.protocol import EVALUATED
from shared.tasks import TaskSpec, one_per_customer

log = logging.getLogger(__name__)

TRAINED, REFUSED_BUDGET, FAILED = "trained", "refused-budget", "failed"

# The only words about a refusal or failure that leave the merchant. Exception text can quote
# private values (customer counts, paths, epsilon spent by other runs), so it is logged here instead.
BUDGET, CALIBRATION, NON_FINITE = "budget", "calibration", "non-finite"
BAD_REQUEST, ERROR = "bad-request", "error"
EVALUATION_LIMIT = "evaluation-limit"  # max-evaluations-per-run reached
WIRE_REASONS = frozenset({"", BUDGET, CALIBRATION, NON_FINITE, BAD_REQUEST, ERROR, EVALUATION_LIMIT})


@dataclass
class RoundOutcome:
    """What a merchant reports after a training round. `adapter` is None unless status is trained."""

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


def ledger_parameters(ledger: Ledger) -> dict[str, str]:
    """The ledger's accountant and privacy unit, for the coordinator's provenance record: settings of
    the merchant and a property of its data source (customer ids or not), never a count or a value."""
    return {"accountant": ledger.accountant, "privacy-unit": ledger.privacy_unit}


@lru_cache(maxsize=2)
def cached_model(
    backbone: str, num_labels: int, lora: LoraSpec, pooling: str, device: str
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
    data = load_merchant_data(
        data_dir, state_dir, task, eval_fraction=eval_fraction, salt=salt, split=split, cutoff=cutoff
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


def _prepare(
    settings: MerchantSettings, cfg: RunConfig
) -> tuple[torch.nn.Module, Encoder, MerchantData, torch.device]:
    device = resolve_device(settings.device)
    backbone = resolve_backbone(cfg.backbone)
    task = cfg.task_spec
    model = cached_model(backbone, task.num_labels, cfg.lora, cfg.pooling, str(device))
    encoder = cached_encoder(backbone, cfg.max_length)
    data = cached_data(
        settings.data_dir,
        settings.state_dir,
        task,
        settings.eval_fraction,
        settings.merchant_id,
        cfg.eval_split,
        cfg.eval_cutoff_time,
    )
    return model, encoder, data, device


def open_ledger(settings: MerchantSettings) -> Ledger:
    """The merchant's ledger, with its own accountant and the privacy unit of its data: a session
    for stores ingested from sources without customer ids (YooChoose), else a customer."""
    from client.ingest.store import REPORT_FILE
    from shared.privacy.units import unit_of_ingest_report

    return Ledger.open(
        settings.ledger_path,
        merchant_id=settings.merchant_id,
        delta=settings.delta,
        max_epsilon=settings.max_epsilon,
        accountant=settings.accountant,
        privacy_unit=unit_of_ingest_report(settings.data_dir / REPORT_FILE),
    )


def noise_for_run(
    ledger: Ledger,
    *,
    run_id: str,
    plan: StepPlan,
    cfg: RunConfig,
    floor: float,
    ceiling: float,
    target: float | None = None,
    reserved: Sequence[Charge] = (),
) -> float:
    """σ for this run: calibrated once for the whole planned horizon against what earlier runs spent
    (the same answer every round and after restarts), never below the merchant's floor. `target` is
    the ε the run may end at (default max-epsilon; lower under max-epsilon-per-run); `reserved` is
    what the run's other releases will charge at most (its evaluations)."""
    earlier = [c for c in ledger.history if c.run_id != run_id]
    sigma = calibrate_noise(
        spent=[*earlier, *reserved],
        sample_rate=plan.sample_rate,
        steps_per_round=plan.steps,
        rounds=cfg.num_rounds,
        max_epsilon=ledger.max_epsilon if target is None else target,
        delta=ledger.delta,
        upper=ceiling,
        accountant=ledger.accountant,
    )
    return max(sigma, cfg.noise_multiplier, floor)


def round_plan(
    ledger: Ledger,
    settings: MerchantSettings,
    cfg: RunConfig,
    *,
    run_id: str,
    customers: int,
    target: float,
) -> tuple[StepPlan, float]:
    """This run's DP-SGD plan and σ, with the run's evaluations reserved: the most local epochs of
    `cfg.epoch_options` whose σ fits under the merchant's noise ceiling. With `local-epochs` 0 a small
    budget (ε = 1 beside the evaluations' reserve) trains fewer epochs instead of refusing; the
    choice reads only earlier runs' charges, so it is the same every round. Raises the last option's
    `CalibrationError` when none fits."""
    reserved = planned_charges(
        run_id=run_id,
        num_rounds=cfg.num_rounds,
        noise_multiplier=settings.eval_noise_multiplier,
        max_per_run=settings.max_evaluations_per_run,
    )

    def fit(epochs: int) -> tuple[StepPlan, float]:
        plan = StepPlan.of(customers, cfg.batch_size, epochs)
        sigma = noise_for_run(
            ledger,
            run_id=run_id,
            plan=plan,
            cfg=cfg,
            floor=settings.min_noise_multiplier,
            ceiling=settings.max_noise_multiplier,
            target=target,
            reserved=reserved,
        )
        if epochs != cfg.epochs:
            log.info(
                "%s trains %d local epochs, not %d: its budget fits no more under noise multiplier %g",
                settings.merchant_id,
                epochs,
                cfg.epochs,
                settings.max_noise_multiplier,
            )
        return plan, sigma

    *more, fewest = cfg.epoch_options
    for epochs in more:
        try:
            return fit(epochs)
        except CalibrationError:
            continue
    return fit(fewest)


def _refuse_before_charge(
    settings: MerchantSettings,
    model: torch.nn.Module,
    adapter: AdapterState,
    customers: int,
    ledger: Ledger,
) -> RoundOutcome | None:
    """A refusal for a malformed incoming adapter or a δ too large for the customers, else None."""
    problem = incoming_problem(model, adapter)
    if problem is not None:
        log.warning("%s rejects the global adapter: %s", settings.merchant_id, problem)
        return RoundOutcome(
            FAILED, settings.merchant_id, ledger.epsilon, ledger.delta, reason=problem, code=BAD_REQUEST
        )
    problem = delta_problem(ledger.delta, customers)
    if problem is not None:
        log.warning("%s refuses to train: %s", settings.merchant_id, problem)
        return RoundOutcome(
            REFUSED_BUDGET,
            settings.merchant_id,
            ledger.epsilon,
            ledger.delta,
            reason=problem,
            code=CALIBRATION,
        )
    return None


def train_round(
    settings: MerchantSettings,
    cfg: RunConfig,
    adapter: AdapterState,
    *,
    server_round: int,
    run_id: str,
    seed: int | None = None,
) -> RoundOutcome:
    """Train the global adapter on this merchant's customers with customer-level DP-SGD, charging
    the ledger first. Nothing is charged for a malformed adapter or an unsafe δ."""
    model, encoder, data, device = _prepare(settings, cfg)
    ledger = open_ledger(settings)
    refusal = _refuse_before_charge(settings, model, adapter, len(data.train_customers), ledger)
    if refusal is not None:
        return refusal
    chosen = data.train_round(f"{run_id}:{server_round}", cfg.examples_per_customer)
    groups = customer_groups([c.customer_id for c in chosen])
    try:
        target = run_epsilon_target(ledger, run_id=run_id, max_epsilon_per_run=settings.max_epsilon_per_run)
        # q over customers, not examples: a customer's up-to-k examples make one clipped gradient
        plan, sigma = round_plan(
            ledger,
            settings,
            cfg,
            run_id=run_id,
            customers=len({c.customer_id for c in chosen}),
            target=target,
        )
        charge = Charge(
            round=server_round,
            run_id=run_id,
            noise_multiplier=sigma,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            max_grad_norm=cfg.max_grad_norm,
        )
        check_run_cap(ledger, charge, target)
        ledger.charge(charge)
    except (BudgetExceededError, CalibrationError) as err:
        log.warning("%s refuses round %d: %s", settings.merchant_id, server_round, err)
        code = BUDGET if isinstance(err, BudgetExceededError) else CALIBRATION
        return RoundOutcome(
            REFUSED_BUDGET, settings.merchant_id, ledger.epsilon, ledger.delta, reason=str(err), code=code
        )
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
        ),
        dp=DPSettings(noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm),
        device=device,
        groups=groups,
        seed=seed,
    )
    if (result.sample_rate, result.steps) != (plan.sample_rate, plan.steps):  # a bug, never data
        raise RuntimeError(f"DP-SGD ran {result} but the ledger was charged for {plan}")
    update = outgoing_guard(extract_adapter(model), spec)
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
        examples=result.examples,
        adapter=update,
        metrics={
            "train_loss": result.loss if math.isfinite(result.loss) else -1.0,
            # the round's charge as written to the ledger; q = local-epochs / steps, nothing new
            "noise_multiplier": sigma,
            "sample_rate": charge.sample_rate,
            "steps": float(charge.steps),
            "max_epsilon": ledger.max_epsilon,  # the merchant's own budget setting
        },
        privacy=ledger_parameters(ledger),
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


def _charge_evaluation(
    settings: MerchantSettings, ledger: Ledger, *, run_id: str, server_round: int
) -> tuple[bool, EvalOutcome | None]:
    """Count and charge this evaluation before anything is computed for release: (whether the
    baseline goes out, None), or (False, a refusal)."""
    counter = EvaluationCounter.open(settings.state_dir)
    if counter.answered(run_id) >= settings.max_evaluations_per_run:
        detail = f"max-evaluations-per-run ({settings.max_evaluations_per_run}) reached for run {run_id}"
        log.warning("%s refuses to evaluate: %s", settings.merchant_id, detail)
        refusal = EvalOutcome(
            REFUSED_BUDGET,
            settings.merchant_id,
            ledger.epsilon,
            ledger.delta,
            reason=detail,
            code=EVALUATION_LIMIT,
        )
        return False, refusal
    with_baseline = not counter.baseline_sent(run_id)
    charge = release_charge(
        server_round=server_round,
        run_id=run_id,
        noise_multiplier=settings.eval_noise_multiplier,
        releases=1 + (BASELINE_RELEASES if with_baseline else 0),
    )
    try:
        target = run_epsilon_target(ledger, run_id=run_id, max_epsilon_per_run=settings.max_epsilon_per_run)
        check_run_cap(ledger, charge, target)
        counter.record(run_id, baseline=with_baseline)  # before the charge: a crash over-counts
        ledger.charge(charge)
    except BudgetExceededError as err:
        log.warning("%s refuses to evaluate round %d: %s", settings.merchant_id, server_round, err)
        return False, EvalOutcome(
            REFUSED_BUDGET, settings.merchant_id, ledger.epsilon, ledger.delta, reason=str(err), code=BUDGET
        )
    return with_baseline, None


def keep_global(
    settings: MerchantSettings, model: torch.nn.Module, cfg: RunConfig, *, run_id: str, server_round: int
) -> None:
    """Keep the accepted global adapter (loaded in `model`) for personalisation, in
    `<state_dir>/global/`. Every participant receives it, so keeping it releases nothing."""
    try:
        save_global(settings.state_dir, model, cfg, run_id=run_id, server_round=server_round)
    except OSError as err:  # a full disk must not fail the round
        log.warning("%s could not keep the global adapter: %s", settings.merchant_id, err)


def evaluate_round(
    settings: MerchantSettings,
    cfg: RunConfig,
    adapter: AdapterState,
    *,
    server_round: int = 0,
    run_id: str = "",
    seed: int | None = None,
) -> EvalOutcome:
    """Noisy histograms of `adapter` (and once per run of the local baseline) on this merchant's
    held-out customers, charged to the ledger first. `seed` is for tests only."""
    model, encoder, data, device = _prepare(settings, cfg)
    ledger = open_ledger(settings)
    problem = incoming_problem(model, adapter)
    if problem is not None:
        log.warning("%s will not evaluate the global adapter: %s", settings.merchant_id, problem)
        return EvalOutcome(
            FAILED, settings.merchant_id, ledger.epsilon, ledger.delta, reason=problem, code=BAD_REQUEST
        )
    load_adapter(model, adapter)
    keep_global(settings, model, cfg, run_id=run_id, server_round=server_round)
    with_baseline, refusal = _charge_evaluation(settings, ledger, run_id=run_id, server_round=server_round)
    if refusal is not None:
        return refusal
    held_out = data.evaluation()
    probs, _ = predict(model, encoder.encode(held_out), batch_size=max(cfg.batch_size, 64), device=device)
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
    record = {"run_id": run_id, "round": server_round, **exact_metrics({**results, **private})}
    log_locally(settings.state_dir, record)
    histograms = noisy_histograms(results, settings.eval_noise_multiplier, seed=seed)
    return EvalOutcome(EVALUATED, settings.merchant_id, ledger.epsilon, ledger.delta, histograms)
