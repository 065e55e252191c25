"""The server trusts nothing a merchant says: norm bounds, capped weights, trimmed mean / median,
server optimizers, and a rogue merchant in a fake federation (no Flower, tiny BERT)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from server.checkpoint import load_server_state, save_server_state
from server.coordinator import REJECTED, TRAINED, Coordinator, Reply
from server.robust import cap_weights, coordinate_median, norm_bound, trim_count, trimmed_mean
from server.server_opt import ServerOptimizer
from server.strategy import RobustPolicy, Update, aggregate_delta, claimed_examples, screen_updates
from shared.adapters import AdapterState
from shared.config import RunConfig

# --- primitives, against hand-computed values -------------------------------------------------------


def test_trimmed_mean_by_hand() -> None:
    values = [
        torch.tensor([1.0, -5.0]),
        torch.tensor([2.0, 0.0]),
        torch.tensor([3.0, 2.0]),
        torch.tensor([100.0, 1.0]),
    ]
    # 4 values, trim 0.25 → drop one at each end: coordinate 0 keeps (2, 3), coordinate 1 keeps (0, 1)
    assert torch.equal(trimmed_mean(values, 0.25), torch.tensor([2.5, 0.5], dtype=torch.float64))
    # trim 0 is the plain mean
    assert torch.allclose(trimmed_mean(values, 0.0), torch.tensor([106 / 4, -2 / 4], dtype=torch.float64))


def test_trimmed_mean_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(9, 5, 3))
    ours = trimmed_mean([torch.from_numpy(x) for x in data], 0.2)
    assert np.allclose(ours.numpy(), stats.trim_mean(data, 0.2, axis=0))


@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(4, 0.25, 1), (3, 0.25, 0), (10, 0.3, 3), (100, 0.29, 29), (3, 0.49, 1), (2, 0.45, 0), (1, 0.4, 0)],
)
def test_trim_count(n: int, fraction: float, k: int) -> None:
    assert trim_count(n, fraction) == k


def test_trim_fraction_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="trim-fraction"):
        trim_count(4, 0.5)


def test_coordinate_median_by_hand_and_against_numpy() -> None:
    odd = [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 7.0]), torch.tensor([2.0, -1.0])]
    assert torch.equal(coordinate_median(odd), torch.tensor([2.0, 0.0], dtype=torch.float64))
    even = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([100.0])]
    assert torch.equal(coordinate_median(even), torch.tensor([2.5], dtype=torch.float64))
    data = np.random.default_rng(1).normal(size=(6, 4, 2))
    assert np.allclose(
        coordinate_median([torch.from_numpy(x) for x in data]).numpy(), np.median(data, axis=0)
    )


def test_cap_weights_clips_to_a_multiple_of_the_median_claim() -> None:
    # median of (10, 20, 30, 10⁹) is 25 → cap 75
    assert cap_weights([10, 20, 30, 1e9], factor=3.0) == [10.0, 20.0, 30.0, 75.0]
    assert cap_weights([10, 20], factor=1.0) == [10.0, 15.0]
    with pytest.raises(ValueError, match="positive"):
        cap_weights([10, 0], factor=3.0)


@pytest.mark.parametrize(
    ("norms", "history", "expected"),
    [
        ([1.0, 2.0, 3.0, 300.0], [], (7.5, 2.5, "round")),  # median 2.5, x3
        ([1.0, 2.0, 3.0, 300.0], [50.0], (7.5, 2.5, "round")),  # the round's own median wins
        ([0.9, 10.0], [2.0, 4.0, 100.0], (12.0, 4.0, "history")),  # two updates: earlier rounds' median
        ([0.9, 10.0], [], (100.0, None, "absolute")),
        ([40.0, 50.0, 60.0], [], (100.0, 50.0, "round")),  # 3 x 50 capped by the absolute ceiling
        ([0.0, 0.0, 0.0], [], (100.0, None, "absolute")),  # zero median: no relative bound
    ],
)
def test_norm_bound(norms: list[float], history: list[float], expected: tuple) -> None:
    assert norm_bound(norms, factor=3.0, absolute=100.0, history=history) == expected


@pytest.mark.parametrize(
    ("value", "count"),
    [(12.0, 12), (1e9, 10**9), (math.nan, 0), (math.inf, 0), ("5", 0), (None, 0), (True, 0)],
)
def test_claimed_examples_never_crashes(value: object, count: int) -> None:
    assert claimed_examples(value) == count


# --- screening and aggregation ----------------------------------------------------------------------

G = {"w": torch.zeros(2), "b": torch.zeros(1)}


def _u(name: str, w: Sequence[float], b: float, n: int) -> Update:
    return Update(name, {"w": torch.tensor(list(w)), "b": torch.tensor([b])}, n)


def test_screening_rejects_outliers_and_caps_weights() -> None:
    updates = [
        _u("a", [1.0, 0.0], 0.0, 10),  # norm 1
        _u("b", [0.0, 2.0], 0.0, 20),  # norm 2
        _u("c", [0.0, 0.0], 3.0, 30),  # norm 3
        _u("x100", [0.0, 0.0], -200.0, 40),  # norm 200 > 3 x median 2.5
        _u("nan", [math.nan, 0.0], 0.0, 40),
        _u("huge", [0.0, 1.0], 0.0, 10**9),  # norm 1, claims 10⁹
    ]
    s = screen_updates(updates, G, RobustPolicy())
    assert set(s.rejected) == {"x100", "nan"}
    assert "non-finite" in s.rejected["nan"] and "exceeds the bound" in s.rejected["x100"]
    # valid norms 1, 2, 3, 200, 1 → median 2 → bound 6
    assert s.bound == pytest.approx(6.0) and s.round_median == pytest.approx(2.0)
    # accepted claims 10, 20, 30, 10⁹ → median 25 → 10⁹ weighs 75
    assert s.weights == [10.0, 20.0, 30.0, 75.0]
    delta = aggregate_delta(s, G, RobustPolicy())
    # by hand: (10·a + 20·b + 30·c + 75·huge) / 135
    assert torch.allclose(delta["w"], torch.tensor([10 / 135, (40 + 75) / 135], dtype=torch.float64))
    assert torch.allclose(delta["b"], torch.tensor([90 / 135], dtype=torch.float64))


def test_small_round_is_bounded_by_earlier_rounds() -> None:
    updates = [_u("a", [0.9, 0.0], 0.0, 10), _u("rogue", [10.0, 0.0], 0.0, 10)]
    s = screen_updates(updates, G, RobustPolicy(), norm_history=[1.0])
    assert list(s.rejected) == ["rogue"] and "history median" in s.rejected["rogue"]
    assert s.round_median is None  # two updates: nothing new for the history
    assert list(screen_updates(updates, G, RobustPolicy()).rejected) == []  # 10 < max-update-norm 100


def test_unknown_aggregation_names_the_key() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        RobustPolicy(aggregation="mean")


# --- server optimizers, against hand-computed steps -------------------------------------------------

D1 = {"w": torch.tensor([0.5, -0.2])}
D2 = {"w": torch.tensor([0.5, 0.2])}
W0 = {"w": torch.tensor([1.0, 2.0])}


def test_fedavg_server_optimizer_is_plain_fedavg() -> None:
    assert torch.allclose(ServerOptimizer("fedavg").step(W0, D1)["w"], torch.tensor([1.5, 1.8]))
    assert torch.allclose(
        ServerOptimizer("fedavg", learning_rate=0.5).step(W0, D1)["w"], torch.tensor([1.25, 1.9])
    )


def test_fedavgm_step_by_hand() -> None:
    opt = ServerOptimizer("fedavgm", momentum=0.9)
    assert opt.learning_rate == pytest.approx(0.1)  # default 1 − β
    w1 = opt.step(W0, D1)  # m = d1
    w2 = opt.step(w1, D2)  # m = 0.9·d1 + d2 = (0.95, 0.02)
    assert torch.allclose(w1["w"], torch.tensor([1.05, 1.98]))
    assert torch.allclose(w2["w"], torch.tensor([1.05 + 0.095, 1.98 + 0.002]))


def test_fedadam_step_by_hand() -> None:
    opt = ServerOptimizer("fedadam", learning_rate=0.1, momentum=0.9)
    w1 = opt.step(W0, D1)
    # m = 0.1·d1 = (0.05, −0.02); v = 0.01·d1² = (0.0025, 0.0004); √v = (0.05, 0.02); τ = 1e-3
    assert torch.allclose(w1["w"], torch.tensor([1 + 0.1 * 0.05 / 0.051, 2 - 0.1 * 0.02 / 0.021]))
    w2 = opt.step(w1, D2)
    # m = 0.9·m + 0.1·d2 = (0.095, 0.002); v = 0.99·v + 0.01·d2² = (0.004975, 0.000796)
    step = [0.1 * 0.095 / (math.sqrt(0.004975) + 1e-3), 0.1 * 0.002 / (math.sqrt(0.000796) + 1e-3)]
    assert torch.allclose(w2["w"], w1["w"] + torch.tensor(step))


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    straight = ServerOptimizer("fedadam", learning_rate=0.1)
    expected = straight.step(straight.step(W0, D1), D2)
    first = ServerOptimizer("fedadam", learning_rate=0.1)
    w1 = first.step(W0, D1)
    save_server_state(tmp_path, 1, first.state_dict(), {"optimizer": first.describe()})
    tensors, meta = load_server_state(tmp_path, 1) or ({}, {})
    resumed = ServerOptimizer("fedadam", learning_rate=0.1)
    resumed.load_state_dict(tensors, meta["optimizer"])
    assert resumed.steps == 1
    assert torch.equal(resumed.step(w1, D2)["w"], expected["w"])
    with pytest.raises(ValueError, match="server-optimizer"):
        ServerOptimizer("fedavgm").load_state_dict(tensors, meta["optimizer"])


# --- a rogue merchant in a fake federation ----------------------------------------------------------

HONEST_CLAIMS = {1: 100, 2: 150, 3: 200}
ATTACKS = ("nan", "x100", "sign-flip", "1e9-examples")  # the rogue's update in rounds 1, 2, 3, 4
ROGUE = 4


def honest_delta(node: int, adapter: AdapterState) -> AdapterState:
    """A fixed direction u per tensor, scaled 1.2 / 1.4 / 1.6 by merchant, plus merchant noise."""
    gen = torch.Generator().manual_seed(1000)
    noise = torch.Generator().manual_seed(node)
    out = {}
    for key in sorted(adapter):
        shape = adapter[key].shape
        u = torch.randn(shape, generator=gen)
        out[key] = 0.01 * ((1 + 0.2 * node) * u + 0.1 * torch.randn(shape, generator=noise))
    return out


def honest_average(adapter: AdapterState) -> AdapterState:
    """Example-weighted FedAvg of the three honest deltas, computed independently of the server."""
    total = sum(HONEST_CLAIMS.values())
    deltas = {n: honest_delta(n, adapter) for n in HONEST_CLAIMS}
    return {k: sum(deltas[n][k] * (c / total) for n, c in HONEST_CLAIMS.items()) for k in adapter}


def _norm(state: AdapterState) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values()))


class RogueFederation:
    """Three honest merchants and one that attacks differently every round; records every adapter."""

    def __init__(self) -> None:
        self.adapters: list[AdapterState] = []  # the global adapter after round 0, 1, 2, …

    def node_ids(self, minimum: int) -> list[int]:
        return [1, 2, 3, ROGUE]

    def train(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        replies = []
        for n in nodes:
            if n == ROGUE:
                delta, claim = self._attack(ATTACKS[(server_round - 1) % len(ATTACKS)], adapter)
            else:
                delta, claim = honest_delta(n, adapter), HONEST_CLAIMS[n]
            new = {k: adapter[k] + delta[k] for k in adapter}
            metrics = {"epsilon": 1.0, "delta": 1e-6, "examples": float(claim)}
            replies.append(Reply(n, TRAINED, f"m{n}", new, metrics))
        return replies

    @staticmethod
    def _attack(kind: str, adapter: AdapterState) -> tuple[AdapterState, float]:
        honest = honest_average(adapter)
        if kind == "nan":
            return {k: torch.full_like(v, math.nan) for k, v in honest.items()}, 120
        if kind == "x100":
            return {k: 100 * v for k, v in honest.items()}, 120
        if kind == "sign-flip":
            return {k: -v for k, v in honest.items()}, 120
        return {k: -v for k, v in honest.items()}, 1e9  # sign-flipped and claiming 10⁹ examples

    def evaluate(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        self.adapters.append({k: v.clone() for k, v in adapter.items()})
        return [
            Reply(n, "evaluated", f"m{n}", None, {"accuracy": 0.5, "loss": 0.7, "examples": 10.0})
            for n in nodes
        ]


def _run(tiny_bert: str, folder: Path, *, resume: bool = False, **overrides: object) -> RogueFederation:
    values = {"backbone": tiny_bert, "num-rounds": 4, "lora-r": 2, "min-train-nodes": 1, **overrides}
    fed = RogueFederation()
    Coordinator(RunConfig.parse(values), fed, folder, console=False).run(resume=resume)
    return fed


def _errors(fed: RogueFederation) -> list[float]:
    """Per round: ‖server's delta − honest FedAvg delta‖ / ‖honest FedAvg delta‖."""
    out = []
    for before, after in zip(fed.adapters, fed.adapters[1:], strict=False):
        honest = honest_average(before)
        got = {k: after[k].double() - before[k].double() for k in before}
        out.append(_norm({k: got[k] - honest[k].double() for k in got}) / _norm(honest))
    return out


# FedAvg's errors by hand. Rounds 1-2: the rogue is rejected, the result is the honest average.
# Round 3: the rogue (−H, 120 examples) is accepted: (450·H − 120·H) / 570 → error 240/570.
# Round 4: its 10⁹ claim is capped to 3 x median(100, 150, 200, 10⁹) = 525 → error 2·525/975
# (uncapped it would be ≈ 2: the rogue would replace the model). FedAvg bounds a rogue's share; only a
# robust aggregate keeps a sign flip out.
FEDAVG_ERRORS = [0.0, 0.0, 240 / 570, 1050 / 975]


@pytest.mark.parametrize("aggregation", ["default", "robust", "fedavg", "trimmed-mean", "median"])
def test_rogue_merchant_cannot_take_over_the_global_adapter(
    tiny_bert: str, tmp_path: Path, aggregation: str
) -> None:
    if aggregation == "default":  # the run config's own default: what a coordinator gets unasked
        assert RunConfig().aggregation == "robust"
        fed = _run(tiny_bert, tmp_path / "run")
    else:
        fed = _run(tiny_bert, tmp_path / "run", aggregation=aggregation)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rogue = [row["merchants"][f"m{ROGUE}"]["status"] for row in rows[1:]]
    assert rogue == [REJECTED, REJECTED, TRAINED, TRAINED]
    assert all(row["merchants"][f"m{n}"]["status"] == TRAINED for row in rows[1:] for n in HONEST_CLAIMS)
    errors = _errors(fed)
    if aggregation == "fedavg":
        assert errors == pytest.approx(FEDAVG_ERRORS, abs=1e-4)
    else:
        # per coordinate the sign-flipped rogue is the extreme value, so trimmed mean and median keep
        # the two middle honest merchants' (1.2·u + 1.4·u)/2 or 1.4·u against the honest 1.444·u: ≈ 0.1
        assert max(errors) < 0.2, errors


def test_resume_continues_the_server_optimizer(tiny_bert: str, tmp_path: Path) -> None:
    opts = {"server-optimizer": "fedadam", "server-learning-rate": 0.01, "aggregation": "median"}
    straight = _run(tiny_bert, tmp_path / "straight", **opts)
    _run(tiny_bert, tmp_path / "split", **{**opts, "num-rounds": 2})
    resumed = _run(tiny_bert, tmp_path / "split", resume=True, **opts)
    # fedadam's moments came back from the round-2 checkpoint: rounds 3-4 match the uninterrupted run
    for key, value in straight.adapters[-1].items():
        assert torch.equal(resumed.adapters[-1][key], value), key
    assert (tmp_path / "split" / "checkpoints" / "server-0004.safetensors").exists()


# --- the robust aggregate against one rogue merchant (issue 21) ----------------------------------------

ROBUST = RobustPolicy(aggregation="robust")


def _honest(n: int, seed: int) -> tuple[list[Update], torch.Tensor]:
    """n honest merchants: a shared direction plus DP-like noise twice its size, 100-300 examples."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(64, generator=gen)
    direction /= direction.norm()
    updates = [
        Update(f"h{i}", {"w": direction + 2.0 * torch.randn(64, generator=gen) / 8.0}, 100 + 50 * (i % 5))
        for i in range(n)
    ]
    return updates, direction


def _rogues(honest: list[Update], direction: torch.Tensor) -> dict[str, Update]:
    norms = sorted(float(u.adapter["w"].norm()) for u in honest)
    median = norms[len(norms) // 2]
    return {
        "nan": Update("r", {"w": torch.full((64,), math.nan)}, 100),
        "x100": Update("r", {"w": 100.0 * honest[0].adapter["w"]}, 100),
        "3x median, 10⁹ claim": Update("r", {"w": -2.99 * median * direction}, 10**9),
        "sign flip": Update("r", {"w": -honest[0].adapter["w"]}, 300),
        "free rider": Update("r", {"w": torch.zeros(64)}, 300),  # sends the previous global back
    }


@pytest.mark.parametrize("n_honest", [3, 7, 15])
def test_the_robust_aggregate_keeps_one_rogue_within_the_honest_range(n_honest: int) -> None:
    """Every coordinate of the robust step lies within the honest merchants' values, whatever the
    rogue sends; the step along the honest direction stays positive (FedAvg's turns negative)."""
    zero = {"w": torch.zeros(64)}
    honest, direction = _honest(n_honest, seed=n_honest)
    stacked = torch.stack([u.adapter["w"].double() for u in honest])
    low, high = stacked.min(0).values, stacked.max(0).values
    for name, rogue in _rogues(honest, direction).items():
        screening = screen_updates([*honest, rogue], zero, ROBUST)
        step = aggregate_delta(screening, zero, ROBUST)["w"]
        assert bool(((step >= low - 1e-12) & (step <= high + 1e-12)).all()), name
        assert float(step @ direction.double()) > 0, name
    flip = _rogues(honest, direction)["3x median, 10⁹ claim"]
    screening = screen_updates([*honest, flip], zero, RobustPolicy(aggregation="fedavg"))
    fedavg = aggregate_delta(screening, zero, RobustPolicy(aggregation="fedavg"))["w"]
    if n_honest <= 7:  # the figures: FedAvg's step turns against the honest direction
        assert float(fedavg @ direction.double()) < 0


def test_with_two_merchants_robust_is_fedavg_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    updates = [_u("a", [1.0, 0.0], 0.0, 10), _u("b", [0.0, 2.0], 0.0, 30)]
    screening = screen_updates(updates, G, ROBUST)
    delta = aggregate_delta(screening, G, ROBUST)
    assert torch.allclose(delta["w"], torch.tensor([10 / 40, 60 / 40], dtype=torch.float64))
    assert "one merchant can steer" in caplog.text


def test_the_robust_trim_drops_at_least_one_from_three_on() -> None:
    from server.robust import robust_trim_count

    assert [robust_trim_count(n, 0.25) for n in (1, 2, 3, 4, 5, 8, 15)] == [0, 0, 1, 1, 1, 2, 3]
    three = [torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([-100.0])]
    assert trimmed_mean(three, 0.25, at_least_one=True).item() == 1.0  # the median of three
