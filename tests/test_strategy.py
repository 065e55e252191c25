"""Adapter FedAvg, update validation, the outgoing guard and the coordinator loop (no Flower)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch

from server.coordinator import (
    FAILED,
    REFUSED,
    TRAINED,
    Coordinator,
    NoMerchantTrainedError,
    Reply,
    sample_nodes,
)
from server.strategy import Update, fedavg, validate_update, weighted_metrics
from shared.adapters import AdapterSpec, OutgoingGuardError, extract_adapter, outgoing_guard
from shared.config import RunConfig
from shared.model import build_model
from shared.model_spec import LoraSpec


def test_fedavg_equals_hand_computed_weighted_average() -> None:
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([1.0])}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([-1.0])}
    c = {"w": torch.tensor([[0.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([4.0])}
    avg = fedavg([Update("a", a, 1), Update("b", b, 3), Update("c", c, 4)])
    # by hand: (1·a + 3·b + 4·c) / 8
    assert torch.allclose(avg["w"], torch.tensor([[16 / 8, 20 / 8], [24 / 8, 32 / 8]]))
    assert torch.allclose(avg["b"], torch.tensor([(1 - 3 + 16) / 8]))


def test_fedavg_of_one_update_is_that_update() -> None:
    a = {"w": torch.randn(3, 3)}
    assert torch.allclose(fedavg([Update("a", a, 7)])["w"], a["w"])


def test_weighted_metrics_by_examples() -> None:
    out = weighted_metrics(
        [{"accuracy": 0.5, "auc": 0.6, "examples": 10}, {"accuracy": 1.0, "examples": 30}],
        ["accuracy", "auc"],
    )
    assert out["accuracy"] == pytest.approx((5 + 30) / 40)
    assert out["auc"] == pytest.approx(0.6)  # only the report that has it
    assert out["examples"] == 40


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"w": torch.zeros(2, 2)}, "missing"),
        ({"w": torch.zeros(2, 2), "b": torch.zeros(1), "extra": torch.zeros(1)}, "unexpected"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(1)}, "shape"),
        ({"w": torch.full((2, 2), float("nan")), "b": torch.zeros(1)}, "non-finite"),
        ({"w": torch.full((2, 2), 100.0), "b": torch.zeros(1)}, "norm"),
    ],
)
def test_validate_update_rejects(update: dict[str, torch.Tensor], reason: str) -> None:
    global_adapter = {"w": torch.zeros(2, 2), "b": torch.zeros(1)}
    assert reason in (validate_update(Update("m", update, 5), global_adapter, max_update_norm=10.0) or "")


def test_outgoing_guard_refuses_base_weights(tiny_bert: str) -> None:
    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2))
    spec = AdapterSpec.of(model)
    adapter = extract_adapter(model)
    assert all("lora_" in k or "classifier" in k for k in adapter)
    assert outgoing_guard(adapter, spec).keys() == adapter.keys()
    full = {**adapter, **{k: v for k, v in model.state_dict().items() if "word_embeddings" in k}}
    with pytest.raises(OutgoingGuardError, match="unexpected tensors"):
        outgoing_guard(full, spec)
    with pytest.raises(OutgoingGuardError, match="shape"):
        key = next(iter(adapter))
        outgoing_guard({**adapter, key: torch.zeros(1)}, spec)
    with pytest.raises(OutgoingGuardError, match="dtype"):
        key = next(iter(adapter))
        outgoing_guard({**adapter, key: adapter[key].long()}, spec)


def test_sample_nodes_respects_fraction_and_minimum() -> None:
    import random

    rng = random.Random(0)
    assert len(sample_nodes(list(range(10)), 0.3, 2, rng)) == 3
    assert len(sample_nodes(list(range(10)), 0.1, 4, rng)) == 4
    assert len(sample_nodes(list(range(3)), 1.0, 5, rng)) == 3


class FakeFederation:
    """Merchants as plain functions: node 1 doubles the adapter, node 2 refuses, node 3 sends garbage."""

    def __init__(self, behaviours: dict[int, str]) -> None:
        self.behaviours = behaviours
        self.sent: list[dict[str, torch.Tensor]] = []

    def node_ids(self, minimum: int) -> list[int]:
        return sorted(self.behaviours)

    def train(self, nodes: Sequence[int], adapter, cfg: RunConfig, server_round: int) -> list[Reply]:
        self.sent.append(adapter)
        out = []
        for n in nodes:
            kind = self.behaviours[n]
            metrics = {"epsilon": 1.0 * server_round, "delta": 1e-6, "examples": 10.0 * n}
            if kind == "good":
                new = {k: v + 0.01 * n for k, v in adapter.items()}
                out.append(Reply(n, TRAINED, f"m{n}", new, metrics, bytes_up=123))
            elif kind == "refuse":
                out.append(Reply(n, REFUSED, f"m{n}", None, metrics, reason="budget"))
            elif kind == "garbage":
                out.append(Reply(n, TRAINED, f"m{n}", {"x": torch.zeros(1)}, metrics))
            else:
                out.append(Reply(n, FAILED, reason="crashed"))
        return out

    def evaluate(self, nodes: Sequence[int], adapter, cfg: RunConfig, server_round: int) -> list[Reply]:
        return [
            Reply(
                n,
                "evaluated",
                f"m{n}",
                None,
                {"accuracy": 0.5, "loss": 0.7, "examples": 10.0, "epsilon": 0.1},
            )
            for n in nodes
        ]


def test_coordinator_averages_good_updates_and_reports_the_rest(tiny_bert: str, tmp_path) -> None:
    cfg = RunConfig.parse({"backbone": tiny_bert, "num-rounds": 2, "lora-r": 2, "min-train-nodes": 1})
    fed = FakeFederation({1: "good", 2: "refuse", 3: "garbage", 4: "good", 5: "fail"})
    run_dir = Coordinator(cfg, fed, tmp_path / "run", console=False).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    statuses = {k: v["status"] for k, v in rows[1]["merchants"].items()}
    assert statuses == {
        "m1": "trained",
        "m2": "refused-budget",
        "m3": "rejected-update",
        "m4": "trained",
        "node-5": "failed",
        "m5": "evaluated",  # failed to train, then evaluated: its charged evaluation is on the record
    }
    assert rows[1]["merchants"]["m5"]["evaluation"]["epsilon"] == pytest.approx(0.1)
    # round 1's global adapter = (10·(g+0.01) + 40·(g+0.04)) / 50 = g + 0.034
    key = next(iter(fed.sent[1]))
    assert torch.allclose(fed.sent[1][key], fed.sent[0][key] + 0.034, atol=1e-6)
    assert (run_dir / "final" / "adapter_config.json").exists()
    assert (run_dir / "checkpoints" / "round-0002.safetensors").exists()


def test_round_without_any_usable_update_stops_the_run(tiny_bert: str, tmp_path) -> None:
    cfg = RunConfig.parse({"backbone": tiny_bert, "num-rounds": 2, "lora-r": 2, "min-train-nodes": 1})
    with pytest.raises(NoMerchantTrainedError, match="no merchant produced a usable update"):
        Coordinator(cfg, FakeFederation({1: "refuse", 2: "fail"}), tmp_path / "run", console=False).run()


def test_resume_continues_from_the_last_checkpoint(tiny_bert: str, tmp_path) -> None:
    cfg = RunConfig.parse({"backbone": tiny_bert, "num-rounds": 1, "lora-r": 2, "min-train-nodes": 1})
    Coordinator(cfg, FakeFederation({1: "good"}), tmp_path / "run", console=False).run()
    more = cfg.model_copy(update={"num_rounds": 3})
    fed = FakeFederation({1: "good"})
    Coordinator(more, fed, tmp_path / "run", console=False).run(resume=True)
    assert len(fed.sent) == 2  # rounds 2 and 3 only
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
