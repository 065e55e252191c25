"""The privacy ledger: epsilon against an independent accountant, persistence, budget refusal."""

from __future__ import annotations

import json

import dp_accounting
import pytest

from shared.privacy import BudgetExceededError, Charge, Ledger, epsilon_of
from shared.privacy.calibration import CalibrationError, calibrate_noise

HISTORIES = [
    [(1.0, 0.01, 1000)],
    [(0.9, 1 / 6, 6), (0.9, 1 / 6, 6), (0.9, 1 / 6, 6)],
    [(1.1, 0.0125, 80), (0.7, 0.05, 200), (2.0, 0.2, 30)],
    [(0.6, 0.004, 5000)],
    [(5.0, 1.0, 10)],  # no subsampling
]


def independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Google's dp-accounting RDP accountant (its own orders and RDP computation)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(event, count=steps)
    return float(accountant.get_epsilon(delta))


def charges(history: list[tuple[float, float, int]]) -> list[Charge]:
    return [Charge(i + 1, "run", sigma, q, steps, 1.0) for i, (sigma, q, steps) in enumerate(history)]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_epsilon_matches_dp_accounting(history: list[tuple[float, float, int]], delta: float) -> None:
    ours = epsilon_of(charges(history), delta)
    theirs = independent_epsilon(history, delta)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_empty_history_is_zero() -> None:
    assert epsilon_of([], 1e-6) == 0.0


def test_ledger_survives_restart_and_accumulates(tmp_path) -> None:
    path = tmp_path / "state" / "privacy-ledger.json"
    ledger = Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=50.0)
    ledger.charge(Charge(1, "run-a", 1.0, 0.1, 10, 0.5))
    first = ledger.epsilon
    del ledger  # a "restart": nothing survives but the file
    again = Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=50.0)
    assert again.epsilon == pytest.approx(first)
    again.charge(Charge(1, "run-b", 1.0, 0.1, 10, 0.5))
    data = json.loads(path.read_text())
    assert len(data["history"]) == 2 and data["epsilon"] > first
    assert data["epsilon"] == pytest.approx(independent_epsilon([(1.0, 0.1, 10)] * 2, 1e-6), rel=0.01)
    assert data["accountant"] == "rdp" and data["privacy_unit"] == "customer" and data["merchant_id"] == "m1"
    assert {"round", "run_id", "noise_multiplier", "sample_rate", "steps", "max_grad_norm"} == set(
        data["history"][0]
    )


def test_budget_refusal_changes_nothing(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    ledger = Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=2.0)
    ledger.charge(Charge(1, "r", 2.0, 0.05, 20, 1.0))
    before = path.read_bytes()
    with pytest.raises(BudgetExceededError) as err:
        ledger.charge(Charge(2, "r", 0.5, 0.5, 100, 1.0))
    assert err.value.would_be > 2.0 >= err.value.current
    assert path.read_bytes() == before
    assert len(Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=2.0).history) == 1


def test_two_handles_never_lose_a_charge(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    a = Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=100.0)
    b = Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=100.0)
    a.charge(Charge(1, "r", 1.0, 0.1, 5, 1.0))
    b.charge(Charge(2, "r", 1.0, 0.1, 5, 1.0))  # b re-reads the file under the lock
    assert len(Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=100.0).history) == 2


def test_ledger_of_another_merchant_is_refused(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0).save()
    with pytest.raises(ValueError, match="belongs to merchant"):
        Ledger.open(path, merchant_id="m2", delta=1e-6, max_epsilon=8.0)


def test_epsilon_in_file_is_recomputed_not_trusted(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    ledger = Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0)
    ledger.charge(Charge(1, "r", 1.0, 0.1, 10, 1.0))
    data = json.loads(path.read_text())
    data["epsilon"] = 0.0
    path.write_text(json.dumps(data))
    assert Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0).epsilon > 0.5


@pytest.mark.parametrize(
    ("q", "steps", "rounds", "target"), [(1 / 6, 6, 3, 8.0), (0.02, 50, 5, 3.0), (0.1, 10, 10, 2.0)]
)
def test_calibration_hits_the_budget_from_below(q: float, steps: int, rounds: int, target: float) -> None:
    spent = [Charge(1, "old", 2.0, 0.1, 10, 1.0)]
    sigma = calibrate_noise(
        spent=spent, sample_rate=q, steps_per_round=steps, rounds=rounds, max_epsilon=target, delta=1e-6
    )
    planned = [Charge(r, "new", sigma, q, steps, 1.0) for r in range(rounds)]
    eps = epsilon_of(spent + planned, 1e-6)
    assert eps <= target
    assert eps >= 0.97 * target  # not wastefully noisy
    history = [(2.0, 0.1, 10)] + [(sigma, q, steps)] * rounds
    assert independent_epsilon(history, 1e-6) <= target * 1.01


def test_calibration_reports_exhausted_budget() -> None:
    spent = [Charge(1, "old", 0.5, 1.0, 100, 1.0)]
    assert epsilon_of(spent, 1e-6) > 1.0
    with pytest.raises(CalibrationError, match="max-epsilon"):
        calibrate_noise(
            spent=spent, sample_rate=0.1, steps_per_round=10, rounds=3, max_epsilon=1.0, delta=1e-6
        )
