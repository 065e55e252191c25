"""Flower ServerApp: parse the run config, wrap the Grid as a `Federation`, run the `Coordinator`."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.audit import WireAudit
from server.coordinator import FAILED, REFUSED, TRAINED, Coordinator, Reply
from shared import histograms, protocol
from shared.adapters import AdapterState
from shared.config import RunConfig

log = logging.getLogger(__name__)

NODE_WAIT_S = 600.0


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
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(adapter),
                protocol.CONFIG: ConfigRecord(cfg.to_record()),  # type: ignore[arg-type]
                protocol.ROUND: ConfigRecord(
                    {protocol.SERVER_ROUND: server_round, protocol.RUN_KEY: self.run_key}
                ),
            }
        )
        messages = [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]
        received = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        # Match replies to requests by message id: when a merchant drops out, the SuperLink answers
        # in its place (an error reply whose source is the SuperLink, not the merchant's node).
        node_of = {m.metadata.message_id: n for m, n in zip(messages, nodes, strict=True)}
        replies = {node_of.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m for m in received}
        if self.audit is not None:
            for n in nodes:
                self.audit.record(server_round, n, replies.get(n))
        return [decode_reply(n, replies.get(n)) for n in nodes]

    def train(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        return self._round_trip(MessageType.TRAIN, nodes, adapter, cfg, server_round)

    def evaluate(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        return self._round_trip(MessageType.EVALUATE, nodes, adapter, cfg, server_round)


# What a merchant may say it did; "rejected-update" is the coordinator's verdict, never a merchant's.
MERCHANT_STATUSES = frozenset({TRAINED, REFUSED, FAILED, protocol.EVALUATED})
MAX_TEXT_CHARS = 100  # merchant-id and reason: a fixed reason is a word, an id a name


class MalformedReplyError(ValueError):
    """A merchant's reply that does not follow the protocol; it marks that merchant failed."""


def decode_reply(node_id: int, msg: Message | None) -> Reply:
    """A `Reply` from a Flower message. A missing, errored or malformed message (no status, an
    unknown status, a list-valued or non-finite metric, a non-integer example count, unreadable
    arrays) is a `failed` reply: one merchant's bad answer never stops the run."""
    if msg is None:
        return Reply(node_id, FAILED, reason="no reply before the round timeout")
    if msg.has_error():
        return Reply(node_id, FAILED, reason=f"client error: {str(msg.error.reason)[:200]}")
    try:
        return _decode_content(node_id, msg.content)
    except Exception as err:  # a hostile or broken merchant may send anything: no error may escape
        log.warning("node %d sent a malformed reply, marked failed: %s", node_id, err)
        return Reply(node_id, FAILED, reason=f"malformed reply: {err}"[:200])


def _decode_content(node_id: int, content: RecordDict) -> Reply:
    status = content.config_records.get(protocol.STATUS)
    if status is None:
        raise MalformedReplyError(f"no {protocol.STATUS!r} config record")
    code, merchant_id, reason = (status.get(k, "") for k in ("status", "merchant-id", "reason"))
    if not isinstance(code, str) or code not in MERCHANT_STATUSES:
        raise MalformedReplyError(f"status {str(code)[:40]!r} is not one of {sorted(MERCHANT_STATUSES)}")
    if not isinstance(merchant_id, str) or not isinstance(reason, str):
        raise MalformedReplyError("merchant-id and reason must be strings")
    arrays = content.array_records.get(protocol.ARRAYS)
    return Reply(
        node_id=node_id,
        status=str(code),
        merchant_id=merchant_id[:MAX_TEXT_CHARS],
        adapter=arrays.to_torch_state_dict() if arrays is not None else None,
        metrics=_metrics(content),
        bytes_up=sum(len(a.data) for a in arrays.values()) if arrays is not None else 0,
        reason=reason[:MAX_TEXT_CHARS],
        histograms=_histograms(content),
        privacy=_privacy(content),
    )


def _privacy(content: RecordDict) -> dict[str, str]:
    """The merchant's accountant and privacy unit, each one of a fixed set of words (or absent)."""
    record = content.config_records.get(protocol.PRIVACY)
    if record is None:
        return {}
    out: dict[str, str] = {}
    for key, value in record.items():
        allowed = protocol.PRIVACY_VALUES.get(key)
        if allowed is None:
            raise MalformedReplyError(f"unknown {protocol.PRIVACY!r} entry {str(key)[:40]!r}")
        if not isinstance(value, str) or value not in allowed:
            raise MalformedReplyError(f"{protocol.PRIVACY} {key!r} must be one of {sorted(allowed)}")
        out[key] = value
    return out


def _histograms(content: RecordDict) -> dict[str, list[float]]:
    """The evaluation histograms (name → finite counts); their shape is checked by the coordinator."""
    record = content.metric_records.get(histograms.RECORD)
    if record is None:
        return {}
    out: dict[str, list[float]] = {}
    for name, values in record.items():
        if name not in histograms.NAMES:
            raise MalformedReplyError(f"unknown histogram {str(name)[:40]!r}")
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise MalformedReplyError(f"histogram {name!r} must be a list of finite numbers")
        out[name] = [float(v) for v in values]
    return out


def _metrics(content: RecordDict) -> dict[str, float]:
    """Scalar, finite metrics; `examples` a non-negative whole number (it weights the average)."""
    record = content.metric_records.get(protocol.METRICS)
    if record is None:
        raise MalformedReplyError(f"no {protocol.METRICS!r} metric record")
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedReplyError(f"metric {key!r} is a {type(value).__name__}, not a number")
        if not math.isfinite(value):
            raise MalformedReplyError(f"metric {key!r} is {value}")
        metrics[key] = float(value)
    examples = metrics.get("examples", 0.0)
    if examples < 0 or not examples.is_integer():
        raise MalformedReplyError(f"metric 'examples' must be a whole number >= 0, got {examples}")
    return metrics


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
