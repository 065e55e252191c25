"""Every privacy decision a merchant makes about a coordinator's message, in one room.

The coordinator picks every message (run config and global adapter), so each message is a query it
aimed. A merchant's reply may depend only on (a) DP releases whose parameters were fixed before the
data was read and charged before release, and (b) public inputs: the merchant's settings, the
approved app and the run plan the merchant pinned. This module decides, before any customer data is
read, whether a message is answered and with which mechanism:

* **the plan is pinned** (`RunBook`): a run's first message is checked against the merchant's
  `[policy]` and recorded under a run record the merchant numbers itself; a later message with the
  same run key and another plan is refused. Caps count per run record and per calendar window on the
  merchant's side, so a fresh run key per message lifts none of them (`max-runs-per-window`,
  `max-epsilon-per-window`);
* **the mechanism comes from a public size** (`public_size`): DP-SGD's q, steps and σ derive from the
  merchant's `declared-customers`, or from a Gaussian estimate of the training-set size charged once
  per run, never from the exact count;
* **the incoming adapter is bounded** (`incoming_problem`): keys, shapes, finite values and a public
  norm bound, so nothing the coordinator sends can make some customers overflow and others not;
* **noise is calibrated for the whole run** (`round_plan`) with the run's evaluations and size
  estimate reserved, under the run's and the window's ε caps;
* **every charge is written before release**, under the ledger's lock, together with the run book.

Refusals raised here (`Refusal`) carry a fixed wire reason; each is a function of the message, the
merchant's settings and its own state (ledger history, run book), never of a customer.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.settings import MerchantSettings
from client.training.loop import StepPlan
from shared.adapters import AdapterSpec, OutgoingGuardError
from shared.config import MerchantPlan
from shared.fileio import atomic_write_json
from shared.privacy import BudgetExceededError, Charge, Ledger, epsilon_of
from shared.privacy.calibration import CalibrationError, calibrate_noise
from shared.protocol import Reason, Status

log = logging.getLogger(__name__)

RUNS_FILE = "runs.json"
DELTA_FACTOR = 10  # δ must stay below 1/(DELTA_FACTOR · customers)
BASELINE_RELEASES = 2
"""The local baseline's perturbed weights and its noisy histogram: two Gaussian mechanisms."""


class Refusal(Exception):
    """A message the merchant will not answer with a release: a status, a fixed wire reason and a
    local detail (logged, never sent)."""

    def __init__(self, status: Status, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


def refused(reason: Reason, detail: str) -> Refusal:
    return Refusal(Status.REFUSED, reason, detail)


def bad_request(detail: str) -> Refusal:
    return Refusal(Status.FAILED, Reason.BAD_REQUEST, detail)


# ------------------------------------------------------------------------------------- the plan


def pinned_plan(cfg: MerchantPlan) -> dict[str, Any]:
    """The part of the run config that decides what a merchant computes (canonical, JSON-able)."""
    return cfg.plan_record()


def policy_problem(settings: MerchantSettings, cfg: MerchantPlan) -> str | None:
    """Why `cfg` is outside the merchant's `[policy]`, or None. Public: settings and plan only."""
    policy = settings.policy
    checks = [
        (cfg.task in policy.tasks, f"task {cfg.task!r} is not in policy.tasks {list(policy.tasks)}"),
        (
            cfg.eval_split in policy.eval_splits,
            f"eval-split {cfg.eval_split!r} is not in policy.eval-splits {list(policy.eval_splits)}",
        ),
        (
            _same_backbone(cfg.backbone, policy.backbones),
            f"backbone {cfg.backbone!r} is not in policy.backbones: the approved app loads only the "
            "backbones the merchant lists",
        ),
        (cfg.num_rounds <= policy.max_rounds, f"num-rounds {cfg.num_rounds} > policy.max-rounds"),
        (max(cfg.epoch_options) <= policy.max_local_epochs, "local-epochs above policy.max-local-epochs"),
        (cfg.batch_size <= policy.max_batch_size, f"batch-size {cfg.batch_size} > policy.max-batch-size"),
        (
            max(cfg.learning_rate, cfg.lora_learning_rate) <= policy.max_learning_rate,
            "a learning rate above policy.max-learning-rate",
        ),
        (
            cfg.examples_per_customer <= policy.max_examples_per_customer,
            "examples-per-customer above policy.max-examples-per-customer",
        ),
    ]
    problems = [text for ok, text in checks if not ok]
    return "; ".join(problems) if problems else None


def _same_backbone(name: str, allowed: tuple[str, ...]) -> bool:
    """Whether `name` is one of the `allowed` backbones ("" and the packaged folder are one)."""
    from shared.model import resolve_backbone

    return resolve_backbone(name) in {resolve_backbone(a) for a in allowed}


@dataclass
class RunRecord:
    """One run as the merchant counts it: its own id, the coordinator's key (a label only), the
    pinned plan, when it started, what it has been answered, and its public training size."""

    record_id: str
    key: str
    plan: dict[str, Any]
    started: float
    trained: list[int] = field(default_factory=list)  # rounds trained (a resumed run may ask one again)
    evaluations: int = 0
    baseline_sent: bool = False
    size: int | None = None  # public: declared, or the run's charged estimate
    size_estimated: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class RunBook:
    """The merchant's run records (`runs.json` in its state folder), read and written only under the
    ledger's lock (`Budget.locked`)."""

    path: Path
    records: list[RunRecord] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: Path) -> RunBook:
        path = state_dir / RUNS_FILE
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records = [RunRecord.from_json(r) for r in data["runs"]]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} is unreadable ({err}); it bounds how often this merchant answers: restore it from "
                "backup rather than delete it"
            ) from None
        return cls(path, records)

    def save(self) -> None:
        atomic_write_json(self.path, {"runs": [r.to_json() for r in self.records]})

    def find(self, key: str) -> RunRecord | None:
        return next((r for r in self.records if r.key == key), None)

    def in_window(self, now: float, days: float) -> list[RunRecord]:
        return [r for r in self.records if now - r.started < days * 86400.0]

    def start(self, key: str, plan: dict[str, Any], now: float) -> RunRecord:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)[:48]
        record = RunRecord(f"{len(self.records) + 1:04d}-{safe}", key, plan, now)
        self.records.append(record)
        return record


# ------------------------------------------------------------------------------------ the budget


@dataclass
class Budget:
    """A merchant's ledger and run book, opened for one message."""

    settings: MerchantSettings
    ledger: Ledger
    book: RunBook

    @classmethod
    def open(cls, settings: MerchantSettings, privacy_unit: str) -> Budget:
        ledger = settings.open_ledger(privacy_unit)
        return cls(settings, ledger, RunBook(settings.state_dir / RUNS_FILE))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's lock, with the ledger and run book re-read from disk, and write the
        run book back on success: concurrent messages never lose a count."""
        with self.ledger.locked():
            self.ledger.reload()
            self.book = RunBook.load(self.settings.state_dir)
            yield
            self.book.save()

    # -- admission (under the lock) ---------------------------------------------------------------

    def admit(self, cfg: MerchantPlan, key: str, *, now: float | None = None) -> RunRecord:
        """The run record of this message's run: found by key with the same plan, or started now if
        the policy and the window's run cap allow. Raises `Refusal`."""
        now = time.time() if now is None else now
        problem = policy_problem(self.settings, cfg)
        if problem is not None:
            raise refused(Reason.POLICY, f"the run plan is outside this merchant's policy: {problem}")
        plan = pinned_plan(cfg)
        record = self.book.find(key)
        if record is not None:
            if record.plan != plan:
                changed = sorted(
                    k for k in plan.keys() | record.plan.keys() if plan.get(k) != record.plan.get(k)
                )
                raise refused(Reason.PLAN_CHANGED, f"run {key!r} was pinned with another plan: {changed}")
            return record
        window = self.book.in_window(now, self.settings.budget_window_days)
        if len(window) >= self.settings.max_runs_per_window:
            raise refused(
                Reason.RUN_LIMIT,
                f"max-runs-per-window ({self.settings.max_runs_per_window} per "
                f"{self.settings.budget_window_days:g} days) reached; run {key!r} not joined",
            )
        return self.book.start(key, plan, now)

    def epsilon_target(self, record: RunRecord) -> float:
        """The ε the ledger may reach by the end of `record`'s run: max-epsilon, capped at what the
        other runs spent plus max-epsilon-per-run, and at what runs before the window spent plus
        max-epsilon-per-window (RDP does not add up: a cap bounds the increase of composed ε)."""
        s, ledger = self.settings, self.ledger
        target = ledger.max_epsilon
        if s.max_epsilon_per_run is not None:
            others = [c for c in ledger.history if c.run_id != record.record_id]
            target = min(
                target, epsilon_of(others, ledger.delta, accountant=ledger.accountant) + s.max_epsilon_per_run
            )
        if s.max_epsilon_per_window is not None:
            window = {r.record_id for r in self.book.in_window(time.time(), s.budget_window_days)}
            before = [c for c in ledger.history if c.run_id not in window]
            target = min(
                target,
                epsilon_of(before, ledger.delta, accountant=ledger.accountant) + s.max_epsilon_per_window,
            )
        return target

    def charge(self, record: RunRecord, charge: Charge) -> None:
        """Write `charge` to the ledger if it keeps the run within its targets; raises `Refusal`."""
        try:
            would_be = self.ledger.epsilon_after(charge)
            target = self.epsilon_target(record)
            if would_be > target:
                raise BudgetExceededError(current=self.ledger.epsilon, would_be=would_be, max_epsilon=target)
            self.ledger.charge(charge)
        except BudgetExceededError as err:
            left = self.ledger.max_epsilon - self.ledger.epsilon
            if err.would_be > self.ledger.max_epsilon:
                future = (
                    f"max-epsilon would be passed (ε {left:.3f} left for good): only a smaller plan "
                    "(fewer rounds or evaluations) can still use this data, or none once it is near 0"
                )
            else:
                future = "this run's or window's cap is reached: a later run or window may continue"
            raise refused(Reason.BUDGET, f"{err}; {future}") from None

    # -- the public training size -----------------------------------------------------------------

    def size_charge(self, record: RunRecord, server_round: int = 0) -> Charge | None:
        """What the run's size estimate charges (None with a declared size)."""
        if self.settings.declared_customers is not None:
            return None
        return release_charge(record.record_id, server_round, self.settings.size_noise_multiplier, releases=1)

    def reserved(self, record: RunRecord, cfg: MerchantPlan) -> list[Charge]:
        """What the run's releases other than training charge at most: its evaluations (with the
        baseline) and its size estimate. Training noise is calibrated with these reserved."""
        out = planned_evaluation_charges(
            record.record_id,
            cfg.num_rounds,
            self.settings.eval_noise_multiplier,
            self.settings.max_evaluations_per_run,
        )
        size = self.size_charge(record)
        return [*out, size] if size is not None else out

    def earlier(self, record: RunRecord) -> list[Charge]:
        return [c for c in self.ledger.history if c.run_id != record.record_id]


def public_size(
    budget: Budget, record: RunRecord, exact: int, *, server_round: int = 0, seed: int | None = None
) -> int:
    """The run's public training-set size, fixed once per run: `declared-customers`, or the exact
    count plus Gaussian noise (σ size-noise-multiplier, sensitivity 1), charged before it is drawn and
    rounded up to two significant digits. Call under `budget.locked()`. Raises `Refusal`."""
    if record.size is not None:
        return record.size
    declared = budget.settings.declared_customers
    if declared is not None:
        record.size = declared
        return declared
    charge = budget.size_charge(record, server_round)
    assert charge is not None
    budget.charge(record, charge)
    rng = np.random.default_rng(seed)
    noisy = exact + rng.normal(0.0, budget.settings.size_noise_multiplier)
    record.size, record.size_estimated = _two_digits(max(noisy, 1.0)), True
    log.info(
        "%s: run %s plans for %d training customers (DP estimate)",
        budget.settings.merchant_id,
        record.key,
        record.size,
    )
    return record.size


def _two_digits(value: float) -> int:
    """`value` rounded up to two significant digits (a coarse public grid: 87 → 87, 1234 → 1300)."""
    if value < 100:
        return math.ceil(value)
    scale = 10 ** (len(str(int(value))) - 2)
    return int(math.ceil(value / scale) * scale)


# -------------------------------------------------------------------------------------- charges


def release_charge(run_id: str, server_round: int, noise_multiplier: float, *, releases: int) -> Charge:
    """The ledger entry for `releases` Gaussian-mechanism releases at σ with sensitivity 1 (sample
    rate 1, one step each; the clip field holds the sensitivity)."""
    return Charge(
        round=server_round,
        run_id=run_id,
        noise_multiplier=noise_multiplier,
        sample_rate=1.0,
        steps=releases,
        max_grad_norm=1.0,
    )


def planned_evaluation_charges(
    run_id: str, num_rounds: int, noise_multiplier: float, max_per_run: int
) -> list[Charge]:
    """What a run's evaluations will charge at most: round 0 plus one per round (capped at
    `max_per_run`), and the baseline once."""
    evaluations = min(num_rounds + 1, max_per_run)
    if evaluations == 0:
        return []
    return [release_charge(run_id, 0, noise_multiplier, releases=evaluations + BASELINE_RELEASES)]


def delta_problem(delta: float, customers: int) -> str | None:
    """Why `delta` is too large for `customers` (public size) training customers, or None."""
    limit = 1.0 / (DELTA_FACTOR * max(customers, 1))
    if delta >= limit:
        return (
            f"delta {delta:g} is not below 1/({DELTA_FACTOR}·{customers} customers) = {limit:.2g}: "
            f"set delta in the merchant settings to at most {limit / 10:.1g}"
        )
    return None


def round_plan(budget: Budget, record: RunRecord, cfg: MerchantPlan, size: int) -> tuple[StepPlan, float]:
    """This run's DP-SGD plan and σ for public size `size`: the most local epochs of
    `cfg.epoch_options` whose σ fits under the merchant's noise ceiling and the run's target, with the
    run's other releases reserved. Reads only earlier runs' charges, so every round of a run gets the
    same answer. Raises `Refusal` (calibration) when none fits."""
    s = budget.settings
    problem = delta_problem(s.delta, size)
    if problem is not None:
        raise refused(Reason.CALIBRATION, problem)
    spent = [*budget.earlier(record), *budget.reserved(record, cfg)]
    target = budget.epsilon_target(record)
    err: CalibrationError | None = None
    for epochs in cfg.epoch_options:
        plan = StepPlan.of(size, cfg.batch_size, epochs)
        try:
            sigma = calibrate_noise(
                spent=spent,
                sample_rate=plan.sample_rate,
                steps_per_round=plan.steps,
                rounds=cfg.num_rounds,
                max_epsilon=target,
                delta=budget.ledger.delta,
                upper=s.max_noise_multiplier,
                accountant=budget.ledger.accountant,
            )
        except CalibrationError as e:
            err = e
            continue
        if epochs != cfg.epochs:
            log.info(
                "%s trains %d local epochs, not %d: its budget fits no more",
                s.merchant_id,
                epochs,
                cfg.epochs,
            )
        return plan, max(sigma, cfg.noise_multiplier, s.min_noise_multiplier)
    raise refused(Reason.CALIBRATION, str(err))


def training_charge(
    budget: Budget, record: RunRecord, cfg: MerchantPlan, server_round: int, size: int
) -> tuple[StepPlan, float]:
    """Plan, count and charge one training round of `record` (under the lock). Raises `Refusal`."""
    if not 1 <= server_round <= cfg.num_rounds:
        raise refused(
            Reason.RUN_LIMIT, f"round {server_round} is outside run {record.key!r}'s 1…{cfg.num_rounds}"
        )
    if server_round not in record.trained and len(record.trained) >= cfg.num_rounds:
        raise refused(Reason.RUN_LIMIT, f"run {record.key!r} already trained its {cfg.num_rounds} rounds")
    plan, sigma = round_plan(budget, record, cfg, size)
    budget.charge(
        record,
        Charge(
            round=server_round,
            run_id=record.record_id,
            noise_multiplier=sigma,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            max_grad_norm=cfg.max_grad_norm,
        ),
    )
    if server_round not in record.trained:
        record.trained.append(server_round)
    return plan, sigma


def evaluation_charge(budget: Budget, record: RunRecord, server_round: int) -> bool:
    """Count and charge one evaluation of `record` (under the lock): whether the run's baseline goes
    out with it. Raises `Refusal` past max-evaluations-per-run or the budget."""
    s = budget.settings
    if record.evaluations >= s.max_evaluations_per_run:
        raise refused(
            Reason.EVALUATION_LIMIT,
            f"max-evaluations-per-run ({s.max_evaluations_per_run}) reached for {record.key}",
        )
    with_baseline = not record.baseline_sent
    releases = 1 + (BASELINE_RELEASES if with_baseline else 0)
    budget.charge(
        record, release_charge(record.record_id, server_round, s.eval_noise_multiplier, releases=releases)
    )
    record.evaluations += 1
    record.baseline_sent = True
    return with_baseline


# ---------------------------------------------------------------------------- the incoming adapter


def incoming_problem(
    model: torch.nn.Module, adapter: Mapping[str, torch.Tensor], max_norm: float
) -> str | None:
    """Why `adapter` may not be used (keys, shapes, dtype, non-finite values, L2 norm above the
    merchant's public bound), or None. Checked before any data is read."""
    try:
        AdapterSpec.of(model).check(adapter, what="incoming adapter")
    except OutgoingGuardError as err:
        return str(err)
    bad = sorted(k for k, v in adapter.items() if not bool(torch.isfinite(v).all()))
    if bad:
        return f"incoming adapter refused: non-finite values in {bad[:3]}{'…' if len(bad) > 3 else ''}"
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in adapter.values()))
    if not norm <= max_norm:
        return f"incoming adapter refused: L2 norm {norm:.3g} above policy.max-adapter-norm {max_norm:g}"
    return None
