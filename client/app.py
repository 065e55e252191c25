"""Flower ClientApp: decode the message, call `client.merchant`, encode the reply. Nothing else.

The model, tokenizer and data are cached at module level by `client.merchant` (a ClientApp object is
rebuilt for every message). Only adapter tensors, scalar metrics, noisy evaluation histograms and a
status with a fixed short reason are put in a reply: an exception's text stays in the merchant's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import merchant
from client.settings import MerchantSettings, from_node_config
from shared import histograms, protocol
from shared.config import RunConfig

log = logging.getLogger(__name__)

app = ClientApp()


def _settings(context: Context, cfg: RunConfig) -> MerchantSettings:
    if "partition-id" in context.node_config and cfg.sim_root:
        # Simulated merchant: materialise its synthetic shop on first use, in its own folder.
        from shared.synthetic import ensure_merchant

        pid = int(context.node_config["partition-id"])
        ensure_merchant(
            cfg.sim_seed, pid, Path(cfg.sim_root) / f"merchant-{pid}", base_customers=cfg.sim_customers
        )
    return from_node_config(context.node_config, cfg.sim_root)


class BadRequestError(ValueError):
    """The coordinator's message could not be read (missing record, wrong type, invalid run config)."""


def _decode(msg: Message) -> tuple[RunConfig, int, str, dict]:
    try:
        cfg = RunConfig.parse(dict(msg.content[protocol.CONFIG]))
        rnd = msg.content[protocol.ROUND]
        adapter = msg.content.array_records[protocol.ARRAYS].to_torch_state_dict()
        return cfg, int(rnd[protocol.SERVER_ROUND]), str(rnd[protocol.RUN_KEY]), adapter  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as err:
        raise BadRequestError(f"{type(err).__name__}: {err}") from err


# The reason a refusal or failure carries when the merchant code gave none.
_DEFAULT_REASON = {merchant.REFUSED_BUDGET: merchant.BUDGET, merchant.FAILED: merchant.ERROR}


def _status(status: str, merchant_id: str, code: str = "") -> ConfigRecord:
    # Only a fixed reason may cross; anything else (a detail, an exception's text) becomes "error".
    reason = (code if code in merchant.WIRE_REASONS else merchant.ERROR) or _DEFAULT_REASON.get(status, "")
    return ConfigRecord({"status": status, "merchant-id": merchant_id, "reason": reason})


def _failure(msg: Message, merchant_id: str, code: str) -> Message:
    content = RecordDict(
        {protocol.METRICS: MetricRecord({}), protocol.STATUS: _status(merchant.FAILED, merchant_id, code)}
    )
    return Message(content=content, reply_to=msg)


Handler = Callable[[RunConfig, int, str, dict, MerchantSettings], RecordDict]


def _answer(msg: Message, context: Context, handler: Handler) -> Message:
    """Run `handler` on the decoded request. Any exception becomes a `failed` reply with a fixed
    reason and its text is logged here only: left to Flower, `str(exception)` would be sent to the
    coordinator verbatim."""
    kind = msg.metadata.message_type
    try:
        cfg, server_round, run_key, adapter = _decode(msg)
        settings = _settings(context, cfg)
    except BadRequestError as err:
        log.error("refusing a malformed %s request: %s", kind, err)
        return _failure(msg, "", merchant.BAD_REQUEST)
    except Exception:
        log.exception("%s request: merchant settings could not be loaded", kind)
        return _failure(msg, "", merchant.ERROR)
    try:
        content = handler(cfg, server_round, run_key, adapter, settings)
    except Exception:
        log.exception("%s %s request failed (round %d)", settings.merchant_id, kind, server_round)
        return _failure(msg, settings.merchant_id, merchant.ERROR)
    return Message(content=content, reply_to=msg)


def _train(
    cfg: RunConfig, server_round: int, run_key: str, adapter: dict, settings: MerchantSettings
) -> RecordDict:
    outcome = merchant.train_round(settings, cfg, adapter, server_round=server_round, run_id=run_key)
    metrics = MetricRecord(
        {"epsilon": outcome.epsilon, "delta": outcome.delta, "examples": outcome.examples, **outcome.metrics}
    )
    content = RecordDict(
        {
            protocol.METRICS: metrics,
            protocol.STATUS: _status(outcome.status, outcome.merchant_id, outcome.code),
        }
    )
    if outcome.adapter is not None:
        content[protocol.ARRAYS] = ArrayRecord(outcome.adapter)  # already through the outgoing guard
    if outcome.privacy:  # the ledger's accountant and privacy unit: words from a fixed set
        content[protocol.PRIVACY] = ConfigRecord(outcome.privacy)  # type: ignore[arg-type]
    return content


def _evaluate(
    cfg: RunConfig, server_round: int, run_key: str, adapter: dict, settings: MerchantSettings
) -> RecordDict:
    outcome = merchant.evaluate_round(settings, cfg, adapter, server_round=server_round, run_id=run_key)
    # Only noisy histograms (charged to the ledger) and their noisy count; exact metrics stay local.
    metrics = {"epsilon": outcome.epsilon, "delta": outcome.delta, "examples": outcome.examples}
    if outcome.histograms:
        # the σ of the Gaussian mechanism (a public parameter): the coordinator reports how far it moves
        # each pooled metric
        metrics["eval_noise_multiplier"] = settings.eval_noise_multiplier
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(metrics),  # type: ignore[arg-type]
            protocol.STATUS: _status(outcome.status, outcome.merchant_id, outcome.code),
        }
    )
    if outcome.histograms:
        values = {name: h.to_values() for name, h in outcome.histograms.items()}
        content[histograms.RECORD] = MetricRecord(values)  # type: ignore[arg-type]
    return content


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _evaluate)
