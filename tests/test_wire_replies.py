"""What a reply carries across the wire (issue 9, "Also"): a merchant sends a status and a fixed short
reason, never an exception's text; the coordinator marks a malformed reply failed and carries on.

Messages are built by hand (flwr `Message` with its `Metadata`), no network and no SuperLink.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

import client.app as client_app
from client import merchant
from client.merchant import RoundOutcome
from client.settings import MerchantSettings
from server.app import GridFederation, decode_reply
from server.coordinator import Coordinator
from shared import protocol
from shared.config import RunConfig
from simulations.synthetic import generate_merchant

SECRET = "31 customers in /srv/shop/events.jsonl"  # what an exception's text may quote


def _metadata(*, message_id: str, src: int, dst: int, kind: str, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )


def delivered(content: RecordDict, metadata: Metadata) -> Message:
    """A message as the SuperLink hands it over, ids included (Flower's constructor for that case)."""
    return Message(content, metadata=metadata)  # type: ignore[call-overload]


def request(kind: str = "train", *, drop: str | None = None, **config: object) -> Message:
    """The coordinator's request to node 7, as the SuperLink delivers it; `drop` removes a record."""
    records: dict[str, Any] = {
        protocol.ARRAYS: ArrayRecord({"w": torch.zeros(2)}),
        protocol.CONFIG: ConfigRecord({**RunConfig().plan_record(), **config}),  # type: ignore[dict-item]
        protocol.ROUND: ConfigRecord({protocol.SERVER_ROUND: 1, protocol.RUN_KEY: "run"}),
    }
    if drop is not None:
        del records[drop]
    content = RecordDict(records)
    return delivered(content, _metadata(message_id="req", src=0, dst=7, kind=kind))


def context(tmp_path: Path) -> Context:
    node_config: dict[str, bool | float | int | str] = {"merchant-id": "m1", "data-dir": str(tmp_path)}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def wire_text(reply: Message) -> str:
    """Every value a reply carries, as text."""
    values = [dict(r) for r in reply.content.values() if isinstance(r, (ConfigRecord, MetricRecord))]
    return json.dumps(values, default=str)


def status_of(reply: Message) -> dict[str, Any]:
    return dict(reply.content.config_records[protocol.STATUS])


# ---------------------------------------------------------------------- the merchant's side


def test_an_exception_text_never_leaves_the_merchant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def crash(*args: object, **kwargs: object) -> RoundOutcome:
        raise ValueError(f"need examples for training, got {SECRET}")

    monkeypatch.setattr(merchant, "train_round", crash)
    monkeypatch.setattr(merchant, "evaluate_round", crash)
    for kind, handler in (("train", client_app.train), ("evaluate", client_app.evaluate)):
        reply = handler(request(kind), context(tmp_path))
        assert not reply.has_error()  # Flower would have sent str(exception) in its error reply
        assert status_of(reply) == {"status": "failed", "merchant-id": "m1", "reason": "error"}
        assert "arrays" not in reply.content.array_records
        assert SECRET not in wire_text(reply)
    assert SECRET in caplog.text  # the detail stays in the merchant's own log


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (
            RoundOutcome("refused-budget", "m1", 7.9, 1e-6, reason=f"max-epsilon, {SECRET}", code="budget"),
            "budget",
        ),
        (RoundOutcome("refused-budget", "m1", 7.9, 1e-6, reason=SECRET, code="calibration"), "calibration"),
        (RoundOutcome("failed", "m1", 7.9, 1e-6, reason=SECRET, code="non-finite"), "non-finite"),
        (RoundOutcome("failed", "m1", 7.9, 1e-6, reason=SECRET, code=SECRET), "error"),  # not a fixed one
        (RoundOutcome("failed", "m1", 7.9, 1e-6, reason=SECRET), "error"),  # none given: the status's
        (RoundOutcome("refused-budget", "m1", 7.9, 1e-6, reason=SECRET), "budget"),
    ],
)
def test_a_refusal_carries_only_its_fixed_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: RoundOutcome, reason: str
) -> None:
    monkeypatch.setattr(merchant, "train_round", lambda *a, **k: outcome)
    reply = client_app.train(request(), context(tmp_path))
    assert status_of(reply) == {"status": outcome.status, "merchant-id": "m1", "reason": reason}
    assert SECRET not in wire_text(reply)


@pytest.mark.parametrize(
    "bad", [{"drop": protocol.ROUND}, {"drop": protocol.ARRAYS}, {"num-roundz": 3}, {"batch-size": "many"}]
)
def test_a_malformed_request_is_refused_as_bad_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: dict[str, Any]
) -> None:
    monkeypatch.setattr(merchant, "train_round", lambda *a, **k: pytest.fail("must not train"))
    reply = client_app.train(request(**bad), context(tmp_path))
    assert status_of(reply) == {"status": "failed", "merchant-id": "", "reason": "bad-request"}


@pytest.fixture
def shop(tmp_path: Path) -> MerchantSettings:
    generate_merchant(3, 0, tmp_path / "m0", base_customers=40)
    return MerchantSettings.from_merchant_dir(tmp_path / "m0", max_epsilon=20.0)


def test_train_round_gives_each_refusal_its_code(
    tiny_bert: str, shop: MerchantSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RunConfig.parse({"backbone": tiny_bert, "lora-r": 2, "batch-size": 16, "max-length": 32})
    model, *_ = merchant._prepare(shop, cfg)
    g = merchant.extract_adapter(model)
    from client.training import budget as budgets
    from shared.privacy import BudgetExceededError, Ledger
    from shared.privacy.calibration import CalibrationError

    def over_budget(*args: object, **kwargs: object) -> float:
        raise BudgetExceededError(current=7.25, would_be=8.5, max_epsilon=8.0)

    def no_sigma(*args: object, **kwargs: object) -> float:
        raise CalibrationError(f"no σ for {SECRET}")

    for target, name, replacement, code in (
        (Ledger, "charge", over_budget, "budget"),
        (budgets, "calibrate_noise", no_sigma, "calibration"),
    ):
        with monkeypatch.context() as mp:
            mp.setattr(target, name, replacement)
            out = merchant.train_round(shop, cfg, g, server_round=1, run_id=f"r-{code}", seed=1)
        assert (out.status, out.code) == ("refused-budget", code)
        assert code in out.reason or SECRET in out.reason  # the local detail is kept for the merchant's log
    monkeypatch.undo()
    nan = {k: torch.full_like(v, math.nan) for k, v in g.items()}
    monkeypatch.setattr(merchant, "extract_adapter", lambda m: nan)
    out = merchant.train_round(shop, cfg, g, server_round=1, run_id="r-nan", seed=1)
    assert (out.status, out.code, out.adapter) == ("failed", "non-finite", None)


# ---------------------------------------------------------------------- the coordinator's side


def reply(
    metrics: dict[str, Any] | None = None,
    *,
    status: dict[str, Any] | None = None,
    arrays: dict[str, torch.Tensor] | None = None,
    node: int = 7,
    to: str = "req",
    kind: str = "train",
) -> Message:
    """A merchant's reply as it arrives at the coordinator; None leaves the record out."""
    records: dict[str, Any] = {}
    if metrics is not None:
        records[protocol.METRICS] = MetricRecord(metrics)
    if status is not None:
        records[protocol.STATUS] = ConfigRecord(status)
    if arrays is not None:
        records[protocol.ARRAYS] = ArrayRecord(arrays)
    meta = _metadata(message_id=f"rep-{node}", src=node, dst=0, kind=kind, reply_to=to)
    return delivered(RecordDict(records), meta)


GOOD_METRICS = {"epsilon": 1.5, "delta": 1e-6, "examples": 40, "noise_multiplier": 0.7}
TRAINED = {"status": "trained", "merchant-id": "m1", "reason": ""}


def test_a_well_formed_reply_is_decoded_exactly() -> None:
    tensors = {"lora_A": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    got = decode_reply(7, reply(GOOD_METRICS, status=TRAINED, arrays=tensors))
    assert (got.node_id, got.status, got.merchant_id, got.reason) == (7, "trained", "m1", "")
    assert got.metrics == {"epsilon": 1.5, "delta": 1e-6, "examples": 40.0, "noise_multiplier": 0.7}
    assert got.adapter is not None and torch.equal(got.adapter["lora_A"], tensors["lora_A"])
    assert got.bytes_up >= 24  # six float32 values, plus Flower's header


MALFORMED: dict[str, Message] = {
    "no status record": reply(GOOD_METRICS),
    "status record without status": reply(GOOD_METRICS, status={"merchant-id": "m1"}),
    "status not a string": reply(GOOD_METRICS, status={**TRAINED, "status": 1}),
    "unknown status": reply(GOOD_METRICS, status={**TRAINED, "status": "rejected-update"}),
    "merchant id a list": reply(GOOD_METRICS, status={**TRAINED, "merchant-id": ["a", "b"]}),
    "no metric record": reply(None, status=TRAINED),
    "list-valued metric": reply({**GOOD_METRICS, "noise_multiplier": [0.1, 0.2]}, status=TRAINED),
    "undeclared metric (an exact loss)": reply({**GOOD_METRICS, "train_loss": 0.7}, status=TRAINED),
    "unknown reason": reply(GOOD_METRICS, status={**TRAINED, "reason": "31 customers"}),
    "NaN count": reply({**GOOD_METRICS, "examples": math.nan}, status=TRAINED),
    "infinite epsilon": reply({**GOOD_METRICS, "epsilon": math.inf}, status=TRAINED),
    "fractional count": reply({**GOOD_METRICS, "examples": 2.5}, status=TRAINED),
    "negative count": reply({**GOOD_METRICS, "examples": -3}, status=TRAINED),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_marks_that_merchant_failed(case: str) -> None:
    got = decode_reply(7, MALFORMED[case])
    assert (got.node_id, got.status, got.adapter) == (7, "failed", None)
    assert got.reason.startswith("malformed reply")


class FakeGrid:
    """Flower's Grid for four merchants, answering with hand-built replies (no SuperLink)."""

    def __init__(self, answer: Callable[[int, Message], Message]) -> None:
        self.answer = answer
        self.pushed: list[str] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3, 4]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            # what the merchant receives: the SuperLink has given the message an id
            message_id = f"req-{len(self.pushed)}"
            self.pushed.append(message_id)
            meta = _metadata(message_id=message_id, src=0, dst=node, kind=kind)
            self.replies.append(self.answer(node, delivered(msg.content, meta)))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        out = [m for m in self.replies if m.metadata.reply_to_message_id in wanted]
        self.replies = [m for m in self.replies if all(m is not o for o in out)]
        return out


def merchant_answer(node: int, msg: Message) -> Message:
    """Node 1 is honest; nodes 2-4 each send one kind of malformed reply, to training and evaluation."""
    to = msg.metadata.message_id
    if msg.metadata.message_type == "evaluate":
        status = {"status": protocol.EVALUATED, "merchant-id": f"m{node}", "reason": ""}
        bad_eval: dict[int, dict[str, Any]] = {
            2: {"examples": math.nan},
            3: {"eval_noise_multiplier": [0.5]},
            4: {"epsilon": math.inf},
        }
        metrics = {"epsilon": 0.1, "examples": 10, "eval_noise_multiplier": 1.0, **bad_eval.get(node, {})}
        # ten held-out customers, every one scored as a buyer; half of them are: accuracy 0.5
        counts = [0.0] * 48
        counts[20], counts[24 + 20] = 5.0, 5.0
        out = reply(metrics, status=status, node=node, to=to, kind="evaluate")
        out.content["histograms"] = MetricRecord({"model": counts})
        return out
    adapter = msg.content.array_records[protocol.ARRAYS].to_torch_state_dict()
    moved = {k: v + 0.01 for k, v in adapter.items()}
    status = {**TRAINED, "merchant-id": f"m{node}"}
    if node == 1:
        return reply(GOOD_METRICS, status=status, arrays=moved, node=node, to=to)
    if node == 2:
        return reply({**GOOD_METRICS, "examples": math.nan}, status=status, arrays=moved, node=node, to=to)
    if node == 3:
        return reply(GOOD_METRICS, arrays=moved, node=node, to=to)  # no status
    return reply({**GOOD_METRICS, "epsilon": [1.0, 2.0]}, status=status, arrays=moved, node=node, to=to)


def test_malformed_replies_never_abort_the_run(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # outside a Flower runtime a new Message needs the process's task identity
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    cfg = RunConfig.parse({"backbone": tiny_bert, "num-rounds": 1, "lora-r": 2, "min-train-nodes": 1})
    federation = GridFederation(FakeGrid(merchant_answer), "run", timeout=None)  # type: ignore[arg-type]
    run_dir = Coordinator(cfg, federation, tmp_path / "run", console=False).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    statuses = {k: v["status"] for k, v in rows[1]["merchants"].items()}
    assert statuses == {"m1": "trained", "node-2": "failed", "node-3": "failed", "node-4": "failed"}
    # only node 1's evaluation counts: its own numbers, not an average with NaN or a list
    assert rows[1]["global"]["accuracy"] == pytest.approx(0.5)
    assert rows[1]["global"]["examples"] == 10


def refusing_answer(node: int, msg: Message) -> Message:
    """Every merchant evaluates round 0, then refuses to train: its budget (1, 2) or its policy (3, 4)."""
    to = msg.metadata.message_id
    if msg.metadata.message_type == "evaluate":
        return merchant_answer(1, msg)
    reason = "budget" if node <= 2 else "policy"
    status = {"status": "refused-budget", "merchant-id": f"m{node}", "reason": reason}
    return reply({"epsilon": 8.0, "delta": 1e-6}, status=status, node=node, to=to)


def test_a_run_where_every_merchant_refuses_says_who_and_why(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from server.coordinator import NoMerchantTrainedError
    from server.deploy import run_summary

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    cfg = RunConfig.parse({"backbone": tiny_bert, "num-rounds": 1, "lora-r": 2, "min-train-nodes": 1})
    federation = GridFederation(FakeGrid(refusing_answer), "run", timeout=None)  # type: ignore[arg-type]
    with pytest.raises(
        NoMerchantTrainedError, match=r"m1: refused-budget \(budget\).*m3: refused-budget \(policy\)"
    ):
        Coordinator(cfg, federation, tmp_path / "run", console=False).run()
    summary = run_summary(tmp_path / "run")
    assert "no merchant produced a usable update" in summary["failure"]
    assert {m: (e["status"], e["reason"]) for m, e in summary["merchants"].items()} == {
        "m1": ("refused-budget", "budget"),
        "m2": ("refused-budget", "budget"),
        "m3": ("refused-budget", "policy"),
        "m4": ("refused-budget", "policy"),
    }


def test_the_coordinator_sends_the_plan_and_nothing_of_its_own(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every message's config is the merchants' plan, key for key: no coordinator-only key leaves."""
    from flwr.supercore.task_identity import TaskIdentity

    from shared.config import COORDINATOR_ONLY_KEYS, PLAN_KEYS

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    received: list[dict[str, Any]] = []

    def answer(node: int, msg: Message) -> Message:
        received.append(dict(msg.content.config_records[protocol.CONFIG]))
        return merchant_answer(1, msg)

    cfg = RunConfig.parse(
        {"backbone": tiny_bert, "num-rounds": 1, "lora-r": 2, "aggregation": "median", "run-name": "secret"}
    )
    federation = GridFederation(FakeGrid(answer), "run", timeout=None)  # type: ignore[arg-type]
    Coordinator(cfg, federation, tmp_path / "run", console=False).run()
    assert received, "no message was sent"
    for config in received:
        assert set(config) == set(PLAN_KEYS) and not set(config) & set(COORDINATOR_ONLY_KEYS)
        assert config == cfg.plan_record()


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a Flower runtime a new Message needs the process's task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class TrickleGrid:
    """A SuperLink whose replies arrive one per pull from the third pull on, or never."""

    def __init__(self, answers: int) -> None:
        self.answers, self.pulls = answers, 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.ids = [f"req-{i}" for i, _ in enumerate(messages)]
        return list(self.ids)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        if self.pulls < 3 or not self.answers:
            return []
        self.answers -= 1
        first = sorted(message_ids)[0]
        return [reply({}, node=1, to=first)]


@pytest.mark.usefixtures("task_identity")
def test_the_coordinator_asks_for_replies_soon_and_then_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's send_and_receive waits 3 s between pulls; `exchange` starts at 50 ms, backs off to 1 s
    while nothing comes, and starts again from the shortest pause when a reply arrives."""
    from server import app as server_app

    pauses: list[float] = []
    monkeypatch.setattr(server_app.time, "sleep", pauses.append)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]
    grid = TrickleGrid(answers=2)
    got = server_app.exchange(grid, messages, timeout=None)  # type: ignore[arg-type]
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["req-0", "req-1"]
    assert pauses == [0.05, 0.1, 0.05]  # two empty pulls, a reply, then the last reply
    assert max(server_app.PULL_INTERVALS_S) <= 1.0


@pytest.mark.usefixtures("task_identity")
def test_the_coordinator_stops_waiting_at_the_round_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from server import app as server_app

    clock = [0.0]
    monkeypatch.setattr(server_app.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(server_app.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    messages = [Message(RecordDict(), dst_node_id=1, message_type="train")]
    grid = TrickleGrid(answers=0)
    assert server_app.exchange(grid, messages, timeout=5.0) == []  # type: ignore[arg-type]
    assert 5.0 <= clock[0] <= 5.0 + 1e-9 and grid.pulls >= 6
