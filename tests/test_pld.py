"""The PLD accountant: epsilon against independent accountants, composition of mixed histories, and
calibration under PLD (hits its target from below, cheaply)."""

from __future__ import annotations

import dp_accounting
import pytest
from opacus.accountants import PRVAccountant

import shared.privacy.accounting as accounting
from shared.privacy import Charge, epsilon_of
from shared.privacy.calibration import CalibrationError, calibrate_noise

# (σ, q, steps) per charge. The first three are the issue's figures (q=0.1, σ=1, 100–500 steps).
HISTORIES = [
    [(1.0, 0.1, 100)],
    [(1.0, 0.1, 300)],
    [(1.0, 0.1, 500)],
    [(0.9, 1 / 6, 6), (0.9, 1 / 6, 6), (0.9, 1 / 6, 6)],
    [(1.1, 0.0125, 80), (0.7, 0.05, 200), (2.0, 0.2, 30)],
    [(0.6, 0.004, 5000)],
    [(5.0, 1.0, 10)],  # no subsampling
]


def charges(history: list[tuple[float, float, int]], run: str = "run") -> list[Charge]:
    return [Charge(i + 1, run, sigma, q, steps, 1.0) for i, (sigma, q, steps) in enumerate(history)]


def dp_accounting_pld(history: list[tuple[float, float, int]], *deltas: float) -> float | list[float]:
    """dp-accounting's own PLD accountant on a 5x finer grid, each charge composed separately, in the
    order given (ours merges equal mechanisms and composes them sorted). One epsilon per delta."""
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=2e-4)
    for sigma, q, steps in history:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    eps = [float(accountant.get_epsilon(delta)) for delta in deltas]
    return eps[0] if len(eps) == 1 else eps


def opacus_prv(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus's PRV accountant (Gopi et al. 2021): a different numerical method altogether."""
    accountant = PRVAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("history", HISTORIES)
def test_pld_matches_dp_accounting(history: list[tuple[float, float, int]]) -> None:
    theirs = dp_accounting_pld(history, 1e-5, 1e-6)
    ours = [epsilon_of(charges(history), delta) for delta in (1e-5, 1e-6)]
    assert ours == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize("history", HISTORIES[:5])
def test_pld_matches_opacus_prv(history: list[tuple[float, float, int]]) -> None:
    assert epsilon_of(charges(history), 1e-5) == pytest.approx(opacus_prv(history, 1e-5), rel=0.01)


def test_issue_figures_pld_is_about_ten_percent_below_rdp() -> None:
    history = charges([(1.0, 0.1, 100)])
    pld, rdp = epsilon_of(history, 1e-5), epsilon_of(history, 1e-5, accountant="rdp")
    assert pld == pytest.approx(7.05, abs=0.01)
    assert rdp == pytest.approx(7.90, abs=0.01)
    for steps in (100, 200, 300, 400, 500):  # tighter everywhere on the issue's range
        longer = charges([(1.0, 0.1, steps)])
        assert epsilon_of(longer, 1e-5) < 0.93 * epsilon_of(longer, 1e-5, accountant="rdp")


def test_several_runs_compose() -> None:
    run_a = charges([(1.0, 0.05, 40)] * 3, run="a")  # three rounds of one run
    run_b = charges([(1.5, 0.02, 100)] * 2, run="b")  # a later run, noisier, other sampling rate
    both = run_a + run_b
    eps_a, eps_b, eps_both = (epsilon_of(h, 1e-6) for h in (run_a, run_b, both))
    assert max(eps_a, eps_b) < eps_both < eps_a + eps_b  # composes, and better than adding epsilons
    # The whole history is two mechanisms, 120 and 200 steps: whatever order or split it was charged in
    assert eps_both == pytest.approx(dp_accounting_pld([(1.0, 0.05, 120), (1.5, 0.02, 200)], 1e-6), rel=0.01)
    assert epsilon_of(list(reversed(both)), 1e-6) == eps_both
    assert epsilon_of(charges([(1.0, 0.05, 120), (1.5, 0.02, 200)]), 1e-6) == eps_both
    # One round more of run a costs less than a fresh run's first round (privacy loss is concave in steps)
    assert epsilon_of(both + charges([(1.0, 0.05, 40)]), 1e-6) - eps_both < eps_a / 3 + 1e-9


def test_unknown_accountant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown accountant 'moments'; use one of pld, rdp"):
        epsilon_of(charges([(1.0, 0.1, 10)]), 1e-6, accountant="moments")


def test_zero_step_charges_cost_nothing() -> None:
    assert epsilon_of(charges([(1.0, 0.1, 0)]), 1e-6) == 0.0
    one = charges([(1.0, 0.1, 10)])
    assert epsilon_of(one + charges([(0.5, 0.5, 0)]), 1e-6) == epsilon_of(one, 1e-6)


CALIBRATIONS = [  # (q, steps per round, rounds, target, spent history)
    (1 / 6, 6, 3, 8.0, []),
    (0.02, 50, 5, 3.0, [(2.0, 0.1, 10)]),
    (0.1, 10, 10, 2.0, [(2.0, 0.1, 10)]),
    (0.0125, 80, 3, 8.0, [(1.0, 0.0125, 240)]),
    (0.01, 100, 20, 0.5, []),
    (1 / 7, 7, 3, 8.0, [(0.9, 1 / 7, 21)]),  # the earlier run is over budget under RDP, not under PLD
]


def test_a_history_over_budget_under_rdp_can_continue_under_pld() -> None:
    spent = charges([(0.9, 1 / 7, 21)])  # the last case above: calibration works from the plan alone
    assert epsilon_of(spent, 1e-6, accountant="rdp") > 8.0 > 7.2 > epsilon_of(spent, 1e-6)
    with pytest.raises(CalibrationError):
        calibrate_noise(
            spent=spent,
            sample_rate=1 / 7,
            steps_per_round=7,
            rounds=3,
            max_epsilon=8.0,
            delta=1e-6,
            accountant="rdp",
        )


@pytest.mark.parametrize(("q", "steps", "rounds", "target", "spent"), CALIBRATIONS)
def test_pld_calibration_hits_target_from_below(
    q: float, steps: int, rounds: int, target: float, spent: list[tuple[float, float, int]], monkeypatch
) -> None:
    calls: list[int] = []
    real = accounting.pld_epsilon

    def counted(segments, delta):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(segments, delta)

    monkeypatch.setattr(accounting, "pld_epsilon", counted)
    sigma = calibrate_noise(
        spent=charges(spent, "old"),
        sample_rate=q,
        steps_per_round=steps,
        rounds=rounds,
        max_epsilon=target,
        delta=1e-6,
    )
    assert len(calls) <= 10  # ~0.05–0.15 s each: calibration, run every round, stays under ~1 s
    monkeypatch.undo()
    planned = charges(spent, "old") + [Charge(r, "new", sigma, q, steps, 1.0) for r in range(rounds)]
    eps = epsilon_of(planned, 1e-6)
    assert 0.995 * target <= eps <= target  # from below, and tight
    assert dp_accounting_pld([*spent, (sigma, q, steps * rounds)], 1e-6) <= target * 1.01


@pytest.mark.parametrize(("q", "steps", "rounds", "target", "spent"), CALIBRATIONS[1:3])
def test_pld_needs_less_noise_than_rdp(
    q: float, steps: int, rounds: int, target: float, spent: list[tuple[float, float, int]]
) -> None:
    sigmas = {
        name: calibrate_noise(
            spent=charges(spent, "old"),
            sample_rate=q,
            steps_per_round=steps,
            rounds=rounds,
            max_epsilon=target,
            delta=1e-6,
            accountant=name,
        )
        for name in ("pld", "rdp")
    }
    assert sigmas["pld"] < 0.97 * sigmas["rdp"]
    planned = charges(spent, "old") + [Charge(r, "new", sigmas["pld"], q, steps, 1.0) for r in range(rounds)]
    assert epsilon_of(planned, 1e-6, accountant="rdp") > target  # PLD's σ would overspend under RDP
