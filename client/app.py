"""Flower ClientApp: decode the request (`shared.protocol`), call `client.merchant`, encode the reply.

The model, tokenizer and data are cached at module level by `client.merchant` (a ClientApp object is
rebuilt for every message). A reply carries only the values `shared.protocol.REPLY_FIELDS` declares,
each a DP release or public, and a status with a fixed reason: an exception's text stays in the
merchant's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import merchant
from client.settings import MerchantSettings, from_node_config
from shared import protocol
from shared.config import RunConfig
from shared.protocol import Reason, Reply, Status

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
        settings = from_node_config(context.node_config, cfg.sim_root)
        # the simulation owns its merchants: their policy admits the simulation's backbone (a
        # deployed SuperNode has no partition-id, and its policy is the merchant's alone)
        policy = settings.policy
        backbones = policy.model_copy(update={"backbones": (*policy.backbones, cfg.backbone)})
        return settings.model_copy(update={"policy": backbones})
    return from_node_config(context.node_config, cfg.sim_root)


# The reason a refusal or failure carries when the merchant code gave none.
_DEFAULT_REASON = {Status.REFUSED: Reason.BUDGET, Status.FAILED: Reason.ERROR}


def _reason(status: Status, code: str) -> Reason:
    # Only a fixed reason may cross; anything else (a detail, an exception's text) becomes "error".
    try:
        reason = Reason(code)
    except ValueError:
        return Reason.ERROR
    return reason if reason is not Reason.NONE else _DEFAULT_REASON.get(status, Reason.NONE)


def _reply(msg: Message, reply: Reply) -> Message:
    return Message(content=protocol.encode_reply(reply), reply_to=msg)


Handler = Callable[[RunConfig, protocol.Request, MerchantSettings], Reply]


def _answer(msg: Message, context: Context, handler: Handler, kind: str) -> Message:
    """Run `handler` on the decoded request. Any exception becomes a `failed` reply with a fixed
    reason and its text is logged here only: left to Flower, `str(exception)` would be sent to the
    coordinator verbatim."""
    try:
        request = protocol.decode_request(msg.content)
        cfg = RunConfig.parse(request.config)
    except ValueError as err:  # BadRequestError or an invalid run config
        log.error("refusing a malformed %s request: %s", kind, err)
        return _reply(msg, Reply(kind, Status.FAILED, reason=Reason.BAD_REQUEST))
    try:
        settings = _settings(context, cfg)
    except Exception:
        log.exception("%s request: merchant settings could not be loaded", kind)
        return _reply(msg, Reply(kind, Status.FAILED, reason=Reason.ERROR))
    try:
        reply = handler(cfg, request, settings)
    except Exception:
        log.exception("%s %s request failed (round %d)", settings.merchant_id, kind, request.server_round)
        reply = Reply(kind, Status.FAILED, settings.merchant_id, Reason.ERROR)
    return _reply(msg, reply)


def _train(cfg: RunConfig, request: protocol.Request, settings: MerchantSettings) -> Reply:
    outcome = merchant.train_round(
        settings, cfg, request.adapter, server_round=request.server_round, run_id=request.run_key
    )
    status = Status(outcome.status)
    metrics = {"epsilon": outcome.epsilon, "delta": outcome.delta}
    if status is Status.TRAINED:  # the run's public size and the charge's public parameters
        metrics |= {"examples": float(outcome.examples), **outcome.metrics}
    return Reply(
        protocol.TRAIN,
        status,
        outcome.merchant_id,
        _reason(status, outcome.code),
        metrics=metrics,
        adapter=outcome.adapter,  # already through the outgoing guard
        privacy=outcome.privacy,  # the ledger's accountant and privacy unit: words from a fixed set
    )


def _evaluate(cfg: RunConfig, request: protocol.Request, settings: MerchantSettings) -> Reply:
    outcome = merchant.evaluate_round(
        settings, cfg, request.adapter, server_round=request.server_round, run_id=request.run_key
    )
    status = Status(outcome.status)
    # Only noisy histograms (charged to the ledger) and their noisy count; exact metrics stay local.
    metrics = {"epsilon": outcome.epsilon, "delta": outcome.delta}
    if outcome.histograms:
        # the σ of the Gaussian mechanism (a public setting): the coordinator reports how far it moves
        # each pooled metric
        metrics |= {
            "examples": float(outcome.examples),
            "eval_noise_multiplier": settings.eval_noise_multiplier,
        }
    return Reply(
        protocol.EVALUATE,
        status,
        outcome.merchant_id,
        _reason(status, outcome.code),
        metrics=metrics,
        histograms={name: h.to_values() for name, h in outcome.histograms.items()},
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _train, protocol.TRAIN)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _evaluate, protocol.EVALUATE)
