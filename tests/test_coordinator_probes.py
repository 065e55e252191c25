"""The coordinator's probes of issue 20, each against the real ClientApp handlers: a reply is a DP
release or public, so none of them reads a customer any more.

1. a free failure oracle (bisecting a time split's cut-off with a malformed adapter);
2. an exact training loss shaped by the coordinator;
3. an overflow bit from a huge but finite head;
4. a mechanism that is a function of the exact customer count;
5. caps keyed by the coordinator's run key;
and the smaller ones: the run book's lock, an infinite σ, a backbone outside the policy, an
evaluation that writes the adapter before its cap.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

from client import merchant
from client.training import budget as budgets
from client.training.budget import Budget
from shared import protocol
from shared.config import RunConfig
from shared.privacy import Charge
from shared.protocol import Reason, Status
from tests.neighbours import (
    ask,
    customers_of,
    fixed_randomness,
    fresh_state,
    global_adapter,
    make_shop,
    message,
    settings,
    without,
)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shop(tmp_path_factory.mktemp("probes") / "D")


def plan(tiny_bert: str, **extra: object) -> dict[str, object]:
    values = {"backbone": tiny_bert, "lora-r": 2, "batch-size": 16, "max-length": 32, "num-rounds": 2}
    return RunConfig.parse({**values, **extra}).plan_record()


def history(s) -> list[dict]:  # type: ignore[no-untyped-def]
    return json.loads(s.ledger_path.read_text())["history"] if s.ledger_path.exists() else []


def times(shop: Path) -> list[datetime]:
    lines = (shop / "events.jsonl").read_text().splitlines()
    return sorted(
        datetime.fromisoformat(json.loads(line)["timestamp"].replace("Z", "+00:00")) for line in lines
    )


# ------------------------------------------------------------------ 1. the failure oracle


def test_bisecting_a_time_cutoff_gets_the_same_answer_everywhere(
    tiny_bert: str, shop: Path, tmp_path: Path
) -> None:
    stamps = times(shop)
    first, last = stamps[0], stamps[-1]
    # cut-offs that empty the training set, the held-out set, and neither
    cutoffs = [first - timedelta(days=1), first + (last - first) / 2, last + timedelta(days=1)]
    s = settings(shop, tmp_path / "state", tiny_bert)
    cfg0 = RunConfig.parse(plan(tiny_bert, **{"eval-split": "time", "eval-cutoff": cutoffs[0].isoformat()}))
    good = global_adapter(cfg0, s)
    malformed = {**good, next(iter(good)): torch.zeros(3, 3)}
    answers = {"malformed": [], "train": [], "evaluate": []}
    for i, cutoff in enumerate(cutoffs):
        config = plan(tiny_bert, **{"eval-split": "time", "eval-cutoff": cutoff.isoformat()})
        for kind in (protocol.TRAIN, protocol.EVALUATE):
            bad = ask(kind, message(kind, config, malformed, key=f"bisect-{i}"), s)
            answers["malformed"].append((bad.status, bad.reason))
        answers["train"].append(ask("train", message("train", config, good, key=f"run-{i}"), s).status)
        evaluated = ask("evaluate", message("evaluate", config, good, key=f"run-{i}"), s)
        answers["evaluate"].append((evaluated.status, sorted(evaluated.histograms)))
    assert set(answers["malformed"]) == {(Status.FAILED, Reason.BAD_REQUEST)}
    assert answers["train"] == [Status.TRAINED] * 3  # an empty training set still takes its noisy steps
    assert answers["evaluate"] == [(Status.EVALUATED, ["local_baseline", "model"])] * 3  # noise on zeros


# ------------------------------------------------------------------ 2. the exact loss


def test_no_exact_loss_leaves_and_neighbours_get_the_same_metrics(
    tiny_bert: str, shop: Path, tmp_path: Path
) -> None:
    config = plan(
        tiny_bert,
        **{"batch-size": 4096, "examples-per-customer": 1, "learning-rate": 1e-12, "local-epochs": 1},
    )
    cfg = RunConfig.parse(config)
    s = settings(shop, tmp_path / "D-state", tiny_bert)
    adapter = global_adapter(cfg, s)
    head_w = next(
        k
        for k in adapter
        if k.endswith("classifier.modules_to_save.default.weight")
        or ("classifier" in k and k.endswith("weight"))
    )
    head_b = head_w[: -len("weight")] + "bias"
    adapter[head_w] = torch.zeros_like(adapter[head_w])
    adapter[head_b] = torch.tensor([0.0, 20.0])
    replies = []
    for i, cid in enumerate(customers_of(shop)[:2]):
        neighbour = without(shop, cid, tmp_path / f"D-{i}")
        for data, state in ((shop, f"s{i}"), (neighbour, f"n{i}")):
            s = settings(data, fresh_state(tmp_path / state), tiny_bert)
            with fixed_randomness():
                replies.append(ask("train", message("train", config, adapter), s))
    assert all(r.status is Status.TRAINED for r in replies)
    assert all("train_loss" not in r.metrics for r in replies)
    assert all(
        set(r.metrics) <= set(k for (rec, k) in protocol.declared("train") if rec == "metrics")
        for r in replies
    )
    assert len({tuple(sorted(r.metrics.items())) for r in replies}) == 1  # D and D − c: the same numbers


# ------------------------------------------------------------------ 3. the overflow bit


def huge_head(adapter: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    out = dict(adapter)
    key = next(k for k in adapter if "classifier" in k and k.endswith("weight"))
    w = torch.zeros_like(adapter[key])
    w[1, 0] = scale  # one row along one direction: large only for inputs far along it
    out[key] = w
    return out


@pytest.mark.parametrize("scale", [2.0**103, 0.99e4])  # past the public norm bound, and just inside it
def test_a_huge_head_gives_the_same_status_with_and_without_the_target(
    tiny_bert: str, shop: Path, tmp_path: Path, scale: float
) -> None:
    config = plan(tiny_bert)
    cfg = RunConfig.parse(config)
    target = customers_of(shop)[5]
    neighbour = without(shop, target, tmp_path / "D-t")
    statuses = []
    for data, state in ((shop, "s"), (neighbour, "n")):
        s = settings(data, fresh_state(tmp_path / state), tiny_bert)
        adapter = huge_head(global_adapter(cfg, s), scale)
        with fixed_randomness():
            for kind in ("evaluate", "train"):
                r = ask(kind, message(kind, config, adapter), s)
                statuses.append((kind, r.status, r.reason))
        if scale > 1e5:
            assert history(s) == []  # refused before any data is read: nothing charged
    assert statuses[:2] == statuses[2:]
    expected = Status.FAILED if scale > 1e5 else None
    if expected is not None:
        assert {st for _, st, _ in statuses} == {Status.FAILED} and {r for *_, r in statuses} == {
            Reason.BAD_REQUEST
        }
    else:
        assert [st for _, st, _ in statuses] == [Status.EVALUATED, Status.TRAINED] * 2


def test_a_non_finite_customer_gradient_is_zeroed_before_clipping() -> None:
    from client.training.customer_dp import clip_and_sum

    grads = [
        torch.tensor([[3.0, 4.0], [float("inf"), 0.0], [float("nan"), 1.0]]),
        torch.tensor([[0.0], [1.0], [2.0]]),
    ]
    summed = clip_and_sum(grads, max_grad_norm=1.0)
    assert torch.allclose(summed[0], torch.tensor([0.6, 0.8])) and torch.allclose(
        summed[1], torch.tensor([0.0])
    )


def test_evaluation_logits_are_clamped() -> None:
    from client.training.loop import LOGIT_BOUND, contained

    out = contained(torch.tensor([[float("inf"), float("nan")], [-1e30, 3.0]]))
    assert out.tolist() == [[LOGIT_BOUND, 0.0], [-LOGIT_BOUND, 3.0]]


# ------------------------------------------------------------------ 4. the exact count


def test_neighbouring_sizes_run_the_same_mechanism(tiny_bert: str, shop: Path, tmp_path: Path) -> None:
    config = plan(tiny_bert, **{"batch-size": 8})
    cfg = RunConfig.parse(config)
    neighbour = without(shop, customers_of(shop)[0], tmp_path / "D-1")
    replies = []
    for data, state in ((shop, "s"), (neighbour, "n")):
        s = settings(data, fresh_state(tmp_path / state), tiny_bert)
        replies.append(ask("train", message("train", config, global_adapter(cfg, s)), s))
    keys = ("examples", "sample_rate", "steps", "noise_multiplier", "epsilon")
    assert [replies[0].metrics[k] for k in keys] == [replies[1].metrics[k] for k in keys]
    assert replies[0].metrics["examples"] == 64  # the declared size, not the exact count
    assert replies[0].metrics["sample_rate"] == pytest.approx(1 / 8)  # 1/⌈64/8⌉


def test_without_a_declared_size_the_size_is_a_charged_estimate(
    tiny_bert: str, shop: Path, tmp_path: Path
) -> None:
    config = plan(tiny_bert)
    s = settings(shop, tmp_path / "state", tiny_bert, declared_customers=None, size_noise_multiplier=5.0)
    cfg = RunConfig.parse(config)
    g = global_adapter(cfg, s)
    first = ask("train", message("train", config, g, round_=1), s)
    second = ask("train", message("train", config, g, round_=2), s)
    size_charges = [h for h in history(s) if h["max_grad_norm"] == 1.0]  # releases record sensitivity 1
    assert len(size_charges) == 1 and size_charges[0]["noise_multiplier"] == 5.0  # charged once per run
    assert first.metrics["examples"] == second.metrics["examples"]  # pinned for the run
    exact = len(merchant._data(s, cfg).train_customers)
    assert abs(first.metrics["examples"] - exact) < 6 * 5.0 + 1


# ------------------------------------------------------------------ 5. caps and run keys


def test_a_new_run_key_lifts_no_cap(tiny_bert: str, shop: Path, tmp_path: Path) -> None:
    config = plan(tiny_bert, **{"num-rounds": 1})
    cfg = RunConfig.parse(config)
    capped = settings(shop, tmp_path / "a", tiny_bert, max_epsilon_per_run=1.0, max_epsilon_per_window=1.0)
    g = global_adapter(cfg, capped)
    replies = [ask("train", message("train", config, g, key=f"fresh-{i}"), capped) for i in range(4)]
    ledger_eps = max(r.metrics["epsilon"] for r in replies)
    assert replies[0].status is Status.TRAINED and ledger_eps <= 1.0 + 1e-9  # was 0.62 → 2.21
    assert {r.reason for r in replies[1:]} <= {Reason.BUDGET, Reason.CALIBRATION}
    runs = settings(shop, tmp_path / "b", tiny_bert, max_runs_per_window=2)
    evaluations = [ask("evaluate", message("evaluate", config, g, key=f"fresh-{i}"), runs) for i in range(4)]
    assert [r.status for r in evaluations] == [Status.EVALUATED] * 2 + [Status.REFUSED] * 2
    assert {r.reason for r in evaluations[2:]} == {Reason.RUN_LIMIT}
    assert sum("local_baseline" in r.histograms for r in evaluations) == 2  # was one per key


def test_a_pinned_plan_cannot_change_within_a_run(tiny_bert: str, shop: Path, tmp_path: Path) -> None:
    s = settings(shop, tmp_path / "state", tiny_bert)
    config = plan(tiny_bert)
    g = global_adapter(RunConfig.parse(config), s)
    assert ask("evaluate", message("evaluate", config, g, round_=0), s).status is Status.EVALUATED
    other = ask("train", message("train", plan(tiny_bert, **{"batch-size": 1}), g), s)
    assert (other.status, other.reason) == (Status.REFUSED, Reason.PLAN_CHANGED)
    # the coordinator's own knobs (aggregation, timeouts) are not part of the merchant's plan
    same = ask(
        "train", message("train", plan(tiny_bert, aggregation="median", **{"round-timeout": 9.0}), g), s
    )
    assert same.status is Status.TRAINED


def test_the_run_book_keeps_every_concurrent_count(tiny_bert: str, shop: Path, tmp_path: Path) -> None:
    s = settings(shop, tmp_path / "state", tiny_bert)
    cfg = RunConfig.parse(plan(tiny_bert))
    first = Budget.open(s, "customer")
    with first.locked():
        first.admit(cfg, "run")

    def count() -> None:
        b = Budget.open(s, "customer")
        with b.locked():
            record = b.book.find("run")
            assert record is not None
            record.evaluations += 1

    threads = [threading.Thread(target=count) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = Budget.open(s, "customer")
    with last.locked():
        assert last.book.find("run").evaluations == 100  # type: ignore[union-attr]  # was 46 of 100


# ------------------------------------------------------------------ the smaller ones


def test_an_infinite_noise_multiplier_is_refused() -> None:
    with pytest.raises(ValueError, match="noise-multiplier"):
        RunConfig.parse({"noise-multiplier": float("inf")})
    with pytest.raises(ValueError, match="finite"):
        Charge(1, "r", float("inf"), 0.1, 10, 1.0)


@pytest.mark.parametrize(
    ("key", "value"), [("local-epochs", 10**6), ("num-rounds", 10**6), ("batch-size", 10**9)]
)
def test_unbounded_plan_values_are_refused(key: str, value: int) -> None:
    with pytest.raises(ValueError, match=key):
        RunConfig.parse({key: value})


def test_a_backbone_outside_the_policy_is_refused_before_loading(
    tiny_bert: str, shop: Path, tmp_path: Path
) -> None:
    s = settings(shop, tmp_path / "state", tiny_bert)
    elsewhere = str(tmp_path / "not-approved")
    config = RunConfig(backbone=elsewhere).plan_record()
    reply = ask("train", message("train", config, {"w": torch.zeros(1)}), s)
    assert (reply.status, reply.reason) == (Status.REFUSED, Reason.POLICY) and history(s) == []
    assert budgets.policy_problem(s, RunConfig(backbone=tiny_bert)) is None


def test_a_refused_evaluation_writes_no_adapter(tiny_bert: str, shop: Path, tmp_path: Path) -> None:
    s = settings(shop, tmp_path / "state", tiny_bert, max_evaluations_per_run=1)
    config = plan(tiny_bert)
    g = global_adapter(RunConfig.parse(config), s)
    assert ask("evaluate", message("evaluate", config, g, round_=0), s).status is Status.EVALUATED
    before = sorted(p.name for p in (s.state_dir / "global").rglob("*"))
    refused = ask("evaluate", message("evaluate", config, g, round_=1), s)
    assert refused.reason is Reason.EVALUATION_LIMIT
    assert sorted(p.name for p in (s.state_dir / "global").rglob("*")) == before


def test_the_packaged_backbone_is_allowed_by_name_or_by_folder(tiny_bert: str, shop: Path) -> None:
    from shared.model import default_backbone

    s = settings(shop, shop / "unused", tiny_bert, policy={"backbones": [""]})
    assert budgets.policy_problem(s, RunConfig(backbone=default_backbone())) is None
    assert budgets.policy_problem(s, RunConfig(backbone="")) is None
    assert "backbone" in (budgets.policy_problem(s, RunConfig(backbone=tiny_bert)) or "")


def test_a_simulated_merchant_admits_the_simulations_backbone(tmp_path: Path) -> None:
    """The Ray simulation owns its merchants (Flower gives them a partition-id, the simulation
    passes its own settings to the ClientApp); a deployed merchant's policy stays its own."""
    from flwr.app import Context, RecordDict

    from client.app import node_settings
    from simulations.run import SimulatedMerchants
    from simulations.synthetic import ensure_merchant

    ensure_merchant(7, 0, tmp_path / "merchant-0", base_customers=20)
    simulated = Context(1, 1, {"partition-id": 0, "num-partitions": 1}, RecordDict(), {})
    merchants = SimulatedMerchants(tmp_path, "bert-base-chinese")
    assert "bert-base-chinese" in merchants(simulated).policy.backbones
    assert merchants(simulated).data_dir == (tmp_path / "merchant-0").resolve()
    deployed = Context(1, 1, {"merchant-id": "m", "data-dir": str(tmp_path)}, RecordDict(), {})
    assert "bert-base-chinese" not in node_settings(deployed).policy.backbones
    with pytest.raises(ValueError, match="no merchant settings"):
        node_settings(simulated)  # the deployed ClientApp knows nothing of simulated shops
