"""The privacy ledger: epsilon against an independent accountant, persistence, budget refusal, the
accountant it keeps, and the privacy unit it records."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest
from pydantic import ValidationError

from client.ingest import ingest
from client.settings import MerchantSettings
from shared.privacy import BudgetExceededError, Charge, Ledger, epsilon_of
from shared.privacy.calibration import CalibrationError, calibrate_noise
from shared.privacy.units import unit_of_ingest_report

HISTORIES = [
    [(1.0, 0.01, 1000)],
    [(0.9, 1 / 6, 6), (0.9, 1 / 6, 6), (0.9, 1 / 6, 6)],
    [(1.1, 0.0125, 80), (0.7, 0.05, 200), (2.0, 0.2, 30)],
    [(0.6, 0.004, 5000)],
    [(5.0, 1.0, 10)],  # no subsampling
]


def independent_epsilon(
    history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """Google's dp-accounting RDP or PLD accountant (its own orders, grid and computation)."""
    if accountant == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:  # a 5x finer grid than ours, each charge composed on its own
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=2e-4)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(event, count=steps)
    return float(acc.get_epsilon(delta))


def charges(history: list[tuple[float, float, int]]) -> list[Charge]:
    return [Charge(i + 1, "run", sigma, q, steps, 1.0) for i, (sigma, q, steps) in enumerate(history)]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_rdp_epsilon_matches_dp_accounting(history: list[tuple[float, float, int]], delta: float) -> None:
    ours = epsilon_of(charges(history), delta, accountant="rdp")
    theirs = independent_epsilon(history, delta)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_empty_history_is_zero() -> None:
    assert epsilon_of([], 1e-6) == 0.0 == epsilon_of([], 1e-6, accountant="rdp")


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
    assert data["epsilon"] == pytest.approx(independent_epsilon([(1.0, 0.1, 10)] * 2, 1e-6, "pld"), rel=0.01)
    assert data["accountant"] == "pld" and data["privacy_unit"] == "customer" and data["merchant_id"] == "m1"
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


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize(
    ("q", "steps", "rounds", "target"), [(1 / 6, 6, 3, 8.0), (0.02, 50, 5, 3.0), (0.1, 10, 10, 2.0)]
)
def test_calibration_hits_the_budget_from_below(
    q: float, steps: int, rounds: int, target: float, accountant: str, tmp_path: Path
) -> None:
    spent = [Charge(1, "old", 2.0, 0.1, 10, 1.0)]
    sigma = calibrate_noise(
        spent=spent,
        sample_rate=q,
        steps_per_round=steps,
        rounds=rounds,
        max_epsilon=target,
        delta=1e-6,
        accountant=accountant,
    )
    planned = [Charge(r, "new", sigma, q, steps, 1.0) for r in range(rounds)]
    eps = epsilon_of(spent + planned, 1e-6, accountant=accountant)
    assert 0.97 * target <= eps <= target  # within budget, and not wastefully noisy
    history = [(2.0, 0.1, 10)] + [(sigma, q, steps)] * rounds
    assert independent_epsilon(history, 1e-6, accountant) <= target * 1.01
    # Every planned round is accepted by a ledger with exactly this budget, the last one included
    ledger = Ledger.open(
        tmp_path / "l.json", merchant_id="m", delta=1e-6, max_epsilon=target, accountant=accountant
    )
    for charge in spent + planned:
        ledger.charge(charge)
    assert ledger.epsilon == eps


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibration_reports_exhausted_budget(accountant: str) -> None:
    spent = [Charge(1, "old", 0.5, 1.0, 100, 1.0)]
    assert epsilon_of(spent, 1e-6, accountant=accountant) > 1.0
    with pytest.raises(CalibrationError, match="max-epsilon"):
        calibrate_noise(
            spent=spent,
            sample_rate=0.1,
            steps_per_round=10,
            rounds=3,
            max_epsilon=1.0,
            delta=1e-6,
            accountant=accountant,
        )


def test_rdp_ledger_is_accounted_with_rdp(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = Ledger.open(path, merchant_id="m1", delta=1e-5, max_epsilon=50.0, accountant="rdp")
    ledger.charge(Charge(1, "r", 1.0, 0.1, 100, 1.0))
    data = json.loads(path.read_text())
    assert data["accountant"] == "rdp"
    assert data["epsilon"] == pytest.approx(7.90, abs=0.01)  # the PLD ledger says 7.05 (test_pld.py)
    again = Ledger.open(path, merchant_id="m1", delta=1e-5, max_epsilon=50.0, accountant="rdp")
    assert again.epsilon == data["epsilon"]


def test_ledger_refuses_another_accountant(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0, accountant="rdp").charge(
        Charge(1, "r", 1.0, 0.1, 10, 1.0)
    )
    with pytest.raises(ValueError, match=r"written with the 'rdp' accountant.*set accountant = 'rdp'"):
        Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0, accountant="pld")
    with pytest.raises(ValueError, match="unknown accountant 'moments'"):
        Ledger.open(
            tmp_path / "new.json", merchant_id="m1", delta=1e-6, max_epsilon=8.0, accountant="moments"
        )


def test_empty_ledger_may_start_with_either_accountant(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0, accountant="rdp").save()  # merchant init
    ledger = Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0, accountant="pld")
    ledger.charge(Charge(1, "r", 1.0, 0.1, 10, 1.0))
    assert json.loads(path.read_text())["accountant"] == "pld"


def test_ledger_keeps_the_weaker_privacy_unit(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0, privacy_unit="session").charge(
        Charge(1, "r", 1.0, 0.1, 10, 1.0)
    )
    assert json.loads(path.read_text())["privacy_unit"] == "session"
    # New data with customer ids does not upgrade what the session-level charges guaranteed
    later = Ledger.open(path, merchant_id="m1", delta=1e-6, max_epsilon=8.0, privacy_unit="customer")
    assert later.privacy_unit == "session"
    later.charge(Charge(2, "r", 1.0, 0.1, 10, 1.0))
    assert json.loads(path.read_text())["privacy_unit"] == "session"
    # ... and a customer-level ledger becomes session-level once session-level data is charged to it
    other = tmp_path / "other.json"
    Ledger.open(other, merchant_id="m1", delta=1e-6, max_epsilon=8.0).charge(
        Charge(1, "r", 1.0, 0.1, 10, 1.0)
    )
    assert Ledger.open(
        other, merchant_id="m1", delta=1e-6, max_epsilon=8.0, privacy_unit="session"
    ).privacy_unit == ("session")
    with pytest.raises(ValueError, match="unknown privacy unit 'household'"):
        Ledger.open(
            tmp_path / "x.json", merchant_id="m1", delta=1e-6, max_epsilon=8.0, privacy_unit="household"
        )


def _ingest(tmp_path: Path, fmt: str) -> Path:
    """A one-customer merchant folder ingested from a tiny file of format `fmt`."""
    src = tmp_path / "src" / fmt
    src.mkdir(parents=True)
    if fmt == "yoochoose":
        (src / "yoochoose-clicks.dat").write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n")
    else:
        (src / "e.jsonl").write_text(
            '{"customer_id": "a", "timestamp": 1717236000, "behavior": "view", "item_id": "i"}\n'
        )
    out = tmp_path / f"merchant-{fmt}"
    ingest(src if fmt == "yoochoose" else src / "e.jsonl", fmt, out)
    return out


@pytest.mark.parametrize(("fmt", "unit"), [("yoochoose", "session"), ("jsonl", "customer")])
def test_open_ledger_records_the_privacy_unit_of_the_source(tmp_path: Path, fmt: str, unit: str) -> None:
    from client.merchant import open_ledger

    folder = _ingest(tmp_path, fmt)
    assert unit_of_ingest_report(folder / "ingest-report.json") == unit
    settings = MerchantSettings.parse(
        {"merchant_id": "m1", "data_dir": folder, "state_dir": folder / "state", "accountant": "rdp"},
        source="test",
    )
    ledger = open_ledger(settings)
    ledger.save()
    data = json.loads(settings.ledger_path.read_text())
    assert (data["privacy_unit"], data["accountant"]) == (unit, "rdp")


def test_privacy_unit_without_or_with_a_broken_ingest_report(tmp_path: Path) -> None:
    assert unit_of_ingest_report(tmp_path / "ingest-report.json") == "customer"  # events.jsonl merchant
    (tmp_path / "ingest-report.json").write_text("{not json")
    with pytest.raises(ValueError, match="re-run `fedbehavior merchant ingest`"):
        unit_of_ingest_report(tmp_path / "ingest-report.json")


def test_settings_accountant_defaults_to_pld_and_is_validated() -> None:
    assert MerchantSettings.parse({"merchant_id": "m1"}, source="test").accountant == "pld"
    with pytest.raises((ValidationError, ValueError), match="accountant"):
        MerchantSettings.parse({"merchant_id": "m1", "accountant": "moments"}, source="test")
