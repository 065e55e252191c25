"""Flower ClientApp: decode the message, call `client.merchant`, encode the reply. Nothing else.

The model, tokenizer and data are cached at module level by `client.merchant` (a ClientApp object is
rebuilt for every message). Only adapter tensors and scalar metrics are put in a reply.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import merchant
from client.settings import MerchantSettings, from_node_config
from shared import protocol
from shared.config import RunConfig

log = logging.getLogger(__name__)

app = ClientApp()


def _settings(context: Context, cfg: RunConfig) -> MerchantSettings:
    if "partition-id" in context.node_config and cfg.sim_root:
        # Simulated merchant: materialise its synthetic shop on first use, in its own folder.
        from simulations.generator import ensure_merchant

        pid = int(context.node_config["partition-id"])
        ensure_merchant(
            cfg.sim_seed, pid, Path(cfg.sim_root) / f"merchant-{pid}", base_customers=cfg.sim_customers
        )
    return from_node_config(context.node_config, cfg.sim_root)


def _decode(msg: Message) -> tuple[RunConfig, int, str, dict]:
    cfg = RunConfig.parse(dict(msg.content[protocol.CONFIG]))
    rnd = msg.content[protocol.ROUND]
    adapter = msg.content.array_records[protocol.ARRAYS].to_torch_state_dict()
    return cfg, int(rnd[protocol.SERVER_ROUND]), str(rnd[protocol.RUN_KEY]), adapter  # type: ignore[arg-type]


def _status(status: str, merchant_id: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"status": status, "merchant-id": merchant_id, "reason": reason[:500]})


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, server_round, run_key, adapter = _decode(msg)
    settings = _settings(context, cfg)
    outcome = merchant.train_round(settings, cfg, adapter, server_round=server_round, run_id=run_key)
    metrics = MetricRecord(
        {"epsilon": outcome.epsilon, "delta": outcome.delta, "examples": outcome.examples, **outcome.metrics}
    )
    content = RecordDict(
        {
            protocol.METRICS: metrics,
            protocol.STATUS: _status(outcome.status, outcome.merchant_id, outcome.reason),
        }
    )
    if outcome.adapter is not None:
        content[protocol.ARRAYS] = ArrayRecord(outcome.adapter)  # already through the outgoing guard
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, _, _, adapter = _decode(msg)
    settings = _settings(context, cfg)
    metrics = merchant.evaluate_round(settings, cfg, adapter)
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(metrics),
            protocol.STATUS: _status(protocol.EVALUATED, settings.merchant_id),
        }
    )
    return Message(content=content, reply_to=msg)
