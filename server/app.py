"""Flower ServerApp: parse the run config, wrap the Grid as a `Federation`, run the `Coordinator`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from server.audit import WireAudit
from server.coordinator import FAILED, Coordinator, Reply
from shared import protocol
from shared.adapters import AdapterState
from shared.config import RunConfig

log = logging.getLogger(__name__)

NODE_WAIT_S = 600.0
PULL_INTERVALS_S = (0.05, 0.1, 0.2, 0.5, 1.0)
"""How long the coordinator waits between asking the SuperLink for replies: soon after sending, then
less often, at most a second. (Flower's `send_and_receive` waits 3 s between pulls in a deployment,
so every round waited up to 3 s after its last reply.)"""


def exchange(grid: Grid, messages: Sequence[Message], timeout: float | None) -> list[Message]:
    """Push `messages` and pull their replies until every one has answered or `timeout` seconds have
    passed (None: until each answers; the SuperLink answers for a merchant that drops out)."""
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    received: list[Message] = []
    empty = 0  # pulls in a row that brought nothing: the longer the silence, the longer the pause
    while waiting:
        replies = list(grid.pull_messages(waiting))
        received.extend(replies)
        waiting.difference_update(m.metadata.reply_to_message_id for m in replies)
        if not waiting:
            break
        empty = 0 if replies else empty + 1  # a reply came in: others may follow soon
        pause = PULL_INTERVALS_S[min(max(empty - 1, 0), len(PULL_INTERVALS_S) - 1)]
        if deadline is not None:
            if time.monotonic() >= deadline:
                break
            pause = min(pause, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
    return received


class GridFederation:
    """The coordinator's view of Flower's Grid: node ids, and train/evaluate round trips."""

    def __init__(
        self, grid: Grid, run_key: str, timeout: float | None, audit: WireAudit | None = None
    ) -> None:
        self.grid, self.run_key, self.timeout, self.audit = grid, run_key, timeout, audit

    def node_ids(self, minimum: int) -> list[int]:
        deadline = time.monotonic() + NODE_WAIT_S
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} merchants connected after {NODE_WAIT_S:.0f} s, "
                    f"need min-available-nodes={minimum}"
                )
            time.sleep(1.0)

    def _round_trip(
        self, kind: str, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        content = protocol.encode_request(
            protocol.Request(cfg.plan_record(), server_round, self.run_key, dict(adapter))
        )
        messages = [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]
        received = exchange(self.grid, messages, self.timeout)
        # Match replies to requests by message id: when a merchant drops out, the SuperLink answers
        # in its place (an error reply whose source is the SuperLink, not the merchant's node).
        node_of = {m.metadata.message_id: n for m, n in zip(messages, nodes, strict=True)}
        replies = {node_of.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m for m in received}
        if self.audit is not None:
            for n in nodes:
                self.audit.record(server_round, n, replies.get(n))
        return [decode_reply(n, replies.get(n), kind) for n in nodes]

    def train(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        return self._round_trip(MessageType.TRAIN, nodes, adapter, cfg, server_round)

    def evaluate(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        return self._round_trip(MessageType.EVALUATE, nodes, adapter, cfg, server_round)


MAX_TEXT_CHARS = protocol.MAX_TEXT_CHARS
MalformedReplyError = protocol.MalformedReplyError


def decode_reply(node_id: int, msg: Message | None, kind: str = protocol.TRAIN) -> Reply:
    """A `Reply` from a Flower message, through the protocol's codec. A missing, errored or
    malformed message (no status, an unknown status or reason, an undeclared, list-valued or
    non-finite metric, a non-integer example count, unreadable arrays) is a `failed` reply: one
    merchant's bad answer never stops the run."""
    if msg is None:
        return Reply(node_id, FAILED, reason="no reply before the round timeout")
    if msg.has_error():
        return Reply(node_id, FAILED, reason=f"client error: {str(msg.error.reason)[:200]}")
    try:
        reply = protocol.decode_reply(kind, msg.content)
    except Exception as err:  # a hostile or broken merchant may send anything: no error may escape
        log.warning("node %d sent a malformed reply, marked failed: %s", node_id, err)
        return Reply(node_id, FAILED, reason=f"malformed reply: {err}"[:200])
    arrays = msg.content.array_records.get(protocol.ARRAYS)
    return Reply(
        node_id=node_id,
        status=reply.status.value,
        merchant_id=reply.merchant_id,
        adapter=reply.adapter,
        metrics=reply.metrics,
        bytes_up=sum(len(a.data) for a in arrays.values()) if arrays is not None else 0,
        reason=reply.reason.value,
        histograms=reply.histograms,
        privacy=reply.privacy,
    )


def home() -> Path:
    return Path(os.environ.get("FEDBEHAVIOR_HOME", Path.home() / ".fedbehavior"))


def resolve_paths(cfg: RunConfig, run_id: int | str) -> RunConfig:
    """Fill in run name, runs folder and (simulation) merchants folder, all absolute."""
    name = cfg.run_name or f"run-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{run_id}"
    runs = Path(cfg.runs_dir).expanduser().resolve() if cfg.runs_dir else home() / "runs"
    sim_root = cfg.sim_root or str(runs / name / "merchants")
    return cfg.model_copy(
        update={"run_name": name, "runs_dir": str(runs), "sim_root": str(Path(sim_root).resolve())}
    )


def run_federated(
    grid: Grid, run_config: Mapping[str, Any], run_id: int | str, *, resume: bool = False
) -> Path:
    cfg = resolve_paths(RunConfig.parse(run_config), run_id)
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    log.info("run %s → %s", cfg.run_name, run_dir)
    federation = GridFederation(
        grid, run_key=cfg.run_name, timeout=cfg.round_timeout or None, audit=WireAudit(run_dir)
    )
    return Coordinator(cfg, federation, run_dir).run(resume=resume or cfg.resume)


def build_server_app(overrides: Mapping[str, Any] | None = None, *, announce: bool = True) -> ServerApp:
    """A ServerApp whose run config is `[tool.flwr.app.config]` overridden by `overrides`.

    `run_simulation` passes an empty run config, so the simulation runner hands its values in here.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        values = {**dict(context.run_config), **dict(overrides or {})}
        run_dir = run_federated(grid, values, context.run_id)
        if announce:  # `flwr run` shows the ServerApp's output; `fedbehavior simulate` prints it last
            print(f"run folder: {run_dir}", flush=True)

    return server_app


app = build_server_app()
