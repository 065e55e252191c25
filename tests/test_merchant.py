"""A merchant's round without Flower: ledger charged first, accumulation across restarts, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client import merchant
from client.settings import MerchantSettings
from client.training.budget import planned_evaluation_charges
from client.training.loop import StepPlan
from shared.adapters import extract_adapter
from shared.config import RunConfig
from shared.privacy import Charge, epsilon_of
from shared.privacy.calibration import CalibrationError, calibrate_noise
from tests.tiny import small_config


def clear_caches() -> None:
    """What a process restart does to the merchant's in-memory state."""
    merchant.cached_model.cache_clear()
    merchant.cached_encoder.cache_clear()
    merchant.cached_data.cache_clear()


SIZE = 50  # the shop's public training size (declared-customers); it has about 48 training customers


def settings_of(shop: Path, **overrides: object) -> MerchantSettings:
    """The shop's settings with a declared size, so q and steps are known without an estimate."""
    return MerchantSettings.from_merchant_dir(shop, **{"declared_customers": SIZE, **overrides})


def global_adapter(cfg: RunConfig, settings: MerchantSettings) -> dict[str, torch.Tensor]:
    model, *_ = merchant._prepare(settings, cfg)
    return extract_adapter(model)


def test_rounds_accumulate_across_runs_and_restarts(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, max_epsilon=20.0)
    cfg = small_config(tiny_bert)
    g = global_adapter(cfg, settings)
    first = merchant.train_round(settings, cfg, g, server_round=1, run_id="run-a", seed=1)
    assert first.status == "trained" and first.adapter is not None and first.examples > 0
    assert first.epsilon > 0
    clear_caches()
    second = merchant.train_round(settings, cfg, g, server_round=1, run_id="run-b", seed=2)
    assert second.epsilon > first.epsilon
    data = json.loads(settings.ledger_path.read_text())
    # each charge names the merchant's own run record (numbered by the merchant) and the run's key
    assert [h["run_id"] for h in data["history"]] == ["0001-run-a", "0002-run-b"]
    recomputed = epsilon_of([Charge.from_json(h) for h in data["history"]], data["delta"])
    assert data["epsilon"] == pytest.approx(recomputed) == pytest.approx(second.epsilon)
    # run-b was calibrated against what run-a had spent, so it is noisier
    assert data["history"][1]["noise_multiplier"] > data["history"][0]["noise_multiplier"]


def test_noise_is_calibrated_for_the_whole_horizon(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, max_epsilon=4.0)
    cfg = small_config(tiny_bert, **{"num-rounds": 3})
    g = global_adapter(cfg, settings)
    outcomes = [
        merchant.train_round(settings, cfg, g, server_round=r, run_id="run", seed=r) for r in (1, 2, 3)
    ]
    assert [o.status for o in outcomes] == ["trained"] * 3
    sigmas = {o.metrics["noise_multiplier"] for o in outcomes}
    assert len(sigmas) == 1  # one σ for the run
    assert outcomes[-1].epsilon <= 4.0
    assert outcomes[-1].epsilon >= 0.95 * 4.0  # the plan used the budget, not a fraction of it
    refused = merchant.train_round(settings, cfg, g, server_round=4, run_id="run", seed=4)
    assert refused.status == "refused-budget" and refused.adapter is None
    assert refused.code == "run-limit" and "round 4" in refused.reason  # outside the plan's rounds
    assert len(json.loads(settings.ledger_path.read_text())["history"]) == 3  # nothing charged


def test_exhausted_budget_refuses_a_new_run(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, max_epsilon=1.0)
    cfg = small_config(tiny_bert, **{"num-rounds": 1})
    g = global_adapter(cfg, settings)
    assert merchant.train_round(settings, cfg, g, server_round=1, run_id="a", seed=1).status == "trained"
    out = merchant.train_round(settings, cfg, g, server_round=1, run_id="b", seed=1)
    assert out.status == "refused-budget"


def test_server_suggestion_cannot_lower_the_merchants_noise_floor(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, max_epsilon=1000.0, min_noise_multiplier=2.5)
    cfg = small_config(tiny_bert, **{"noise-multiplier": 0.1})
    out = merchant.train_round(
        settings, cfg, global_adapter(cfg, settings), server_round=1, run_id="a", seed=1
    )
    assert out.metrics["noise_multiplier"] == pytest.approx(2.5)


def test_evaluation_reports_charged_histograms_and_epsilon(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop)
    cfg = small_config(tiny_bert)
    out = merchant.evaluate_round(settings, cfg, global_adapter(cfg, settings), server_round=0, run_id="r")
    assert out.status == "evaluated" and set(out.histograms) == {"model", "local_baseline"}
    assert out.epsilon > 0 and out.delta == 1e-6  # charged before release (tests/test_evaluation.py)


def test_ledger_records_q_over_the_public_size(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, max_epsilon=20.0)
    cfg = small_config(tiny_bert, **{"examples-per-customer": 3})
    out = merchant.train_round(
        settings, cfg, global_adapter(cfg, settings), server_round=1, run_id="a", seed=1
    )
    n = len(merchant._prepare(settings, cfg)[2].train_customers)
    assert n != SIZE and out.examples == SIZE  # the declared size leaves, never the exact count
    (charge,) = json.loads(settings.ledger_path.read_text())["history"]
    batches = -(-SIZE // 16)  # ceil(size / batch-size)
    # one epoch is ⌈M/B⌉ steps at q = 1/⌈M/B⌉; head-only mode runs 10 epochs a round by default
    assert cfg.epochs == 10
    assert charge["sample_rate"] == pytest.approx(1 / batches) and charge["steps"] == batches * cfg.epochs


def test_a_small_budget_trains_fewer_epochs_instead_of_refusing(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, max_epsilon=1.0, max_noise_multiplier=5.0)
    cfg = small_config(tiny_bert)  # local-epochs 0: 10, or 5, 2, 1 where the budget fits no more
    n = SIZE
    reserved = planned_evaluation_charges("a", 2, 20.0, 11)

    def fits(epochs: int) -> bool:  # the evaluations' reserve plus 2 rounds under σ ≤ 5, by hand
        plan = StepPlan.of(n, 16, epochs)
        try:
            calibrate_noise(
                spent=reserved,
                sample_rate=plan.sample_rate,
                steps_per_round=plan.steps,
                rounds=2,
                max_epsilon=1.0,
                delta=1e-6,
                upper=5.0,
            )
        except CalibrationError:
            return False
        return True

    expected = max(e for e in (10, 5, 2, 1) if fits(e))
    assert expected < 10  # the budget is too small for the default
    g = global_adapter(cfg, settings)
    outcomes = [merchant.train_round(settings, cfg, g, server_round=r, run_id="a", seed=r) for r in (1, 2)]
    assert [o.status for o in outcomes] == ["trained"] * 2
    history = json.loads(settings.ledger_path.read_text())["history"]
    assert [h["steps"] for h in history] == [-(-n // 16) * expected] * 2  # the same plan each round
    assert history[0]["noise_multiplier"] <= 5.0 and outcomes[-1].epsilon <= 1.0
    clear_caches()
    fixed = settings_of(shop, max_epsilon=1.0, max_noise_multiplier=5.0)
    out = merchant.train_round(
        fixed, small_config(tiny_bert, **{"local-epochs": 10}), g, server_round=1, run_id="b", seed=1
    )
    assert out.status == "refused-budget"  # an explicit local-epochs is kept, or refused


def test_a_malformed_global_adapter_is_refused_before_any_charge(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, max_epsilon=20.0)
    cfg = small_config(tiny_bert)
    good = global_adapter(cfg, settings)
    key = next(iter(good))
    nan = {**good, key: torch.full_like(good[key], float("nan"))}
    wrong_shape = {**good, key: torch.zeros(3, 3)}
    extra = {**good, "bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}
    for bad in (nan, wrong_shape, extra):
        out = merchant.train_round(settings, cfg, bad, server_round=1, run_id="a", seed=1)
        assert out.status == "failed" and out.adapter is None and out.epsilon == 0.0
    assert not settings.ledger_path.exists() or json.loads(settings.ledger_path.read_text())["history"] == []


def test_per_run_cap_bounds_a_one_round_run(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, max_epsilon=8.0, max_epsilon_per_run=2.0)
    cfg = small_config(tiny_bert, **{"num-rounds": 1})  # a coordinator asking to spend everything at once
    g = global_adapter(cfg, settings)
    first = merchant.train_round(settings, cfg, g, server_round=1, run_id="a", seed=1)
    assert first.status == "trained" and 0.95 * 2.0 <= first.epsilon <= 2.0
    extra_round = merchant.train_round(settings, cfg, g, server_round=2, run_id="a", seed=2)
    assert extra_round.status == "refused-budget" and extra_round.code == "run-limit"
    second_run = merchant.train_round(settings, cfg, g, server_round=1, run_id="b", seed=3)
    assert second_run.status == "trained" and first.epsilon + 1.0 < second_run.epsilon <= 4.0
    assert len(json.loads(settings.ledger_path.read_text())["history"]) == 2


def test_delta_not_far_below_one_over_customers_is_refused(tiny_bert: str, shop: Path) -> None:
    settings = settings_of(shop, delta=5e-3)  # ~50 customers: limit 1/500
    cfg = small_config(tiny_bert)
    out = merchant.train_round(
        settings, cfg, global_adapter(cfg, settings), server_round=1, run_id="a", seed=1
    )
    assert out.status == "refused-budget" and "delta" in out.reason and out.adapter is None
    assert not settings.ledger_path.exists() or json.loads(settings.ledger_path.read_text())["history"] == []


def test_the_budget_command_lists_the_run_book(
    tiny_bert: str, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from client.cli import cmd_budget

    settings = settings_of(shop, max_epsilon=20.0)
    cfg = small_config(tiny_bert)
    merchant.train_round(
        settings, cfg, global_adapter(cfg, settings), server_round=1, run_id="spring", seed=1
    )
    assert cmd_budget(argparse.Namespace(ledger=str(settings.state_dir))) == 0
    out = capsys.readouterr().out
    runs = out.split("run record")[1]  # the run book, after the ledger's charges
    row = next(line for line in runs.splitlines() if line.startswith("0001-spring"))
    assert row.split()[-3:] == ["1", "0", str(SIZE)]  # one round trained, no evaluation, the declared size


def test_merchant_start_warns_when_no_run_can_use_the_data(shop: Path) -> None:
    from client.cli import budget_warning
    from shared.privacy import Ledger

    settings = settings_of(shop, max_epsilon=0.5)
    assert budget_warning(settings) == ""  # nothing spent yet
    ledger = Ledger.open(settings.ledger_path, merchant_id=settings.merchant_id, delta=1e-6, max_epsilon=0.5)
    ledger.charge(Charge(1, "a", 30.0, 1.0, 1, 1.0))  # ε 0.12: one σ-20 evaluation still fits (0.23)
    assert budget_warning(settings) == ""
    ledger.charge(Charge(2, "a", 9.0, 1.0, 1, 1.0))  # ε 0.465: one more evaluation would reach 0.51
    assert "spent its privacy budget" in budget_warning(settings)
