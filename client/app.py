"""Flower ClientApp: decode the request (`shared.protocol`), call `client.merchant`, encode the reply.

The model, tokenizer and data are cached at module level by `client.merchant` (a ClientApp object is
rebuilt for every message). A reply carries only the values `shared.protocol.REPLY_FIELDS` declares,
each a DP release or public, and a status with a fixed reason: an exception's text stays in the
merchant's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import merchant
from client.settings import MerchantSettings, from_node_config
from shared import protocol
from shared.config import MerchantPlan
from shared.protocol import Reason, Reply, Status

log = logging.getLogger(__name__)

SettingsOf = Callable[[Context], MerchantSettings]
"""Where a message's merchant settings come from: its node's context → the merchant's settings."""


def node_settings(context: Context) -> MerchantSettings:
    """A deployed merchant's settings: its SuperNode's node config names its folder (or its keys)."""
    return from_node_config(context.node_config)


# The reason a refusal or failure carries when the merchant code gave none.
_DEFAULT_REASON = {Status.REFUSED: Reason.BUDGET, Status.FAILED: Reason.ERROR}


def _reason(status: Status, code: str) -> Reason:
    # Only a fixed reason may cross; anything else (a detail, an exception's text) becomes "error".
    try:
        reason = Reason(code)
    except ValueError:
        return Reason.ERROR
    return reason if reason is not Reason.NONE else _DEFAULT_REASON.get(status, Reason.NONE)


def _message(msg: Message, reply: Reply) -> Message:
    return Message(content=protocol.encode_reply(reply), reply_to=msg)


Handler = Callable[[MerchantPlan, protocol.Request, MerchantSettings], Reply]


def _answer(msg: Message, context: Context, handler: Handler, kind: str, settings_of: SettingsOf) -> Message:
    """Run `handler` on the decoded request. Any exception becomes a `failed` reply with a fixed
    reason and its text is logged here only: left to Flower, `str(exception)` would be sent to the
    coordinator verbatim."""
    log.info("ClientApp: %s message %s received", kind, msg.metadata.message_id)
    try:
        request = protocol.decode_request(msg.content)
        cfg = MerchantPlan.parse(request.config)
    except ValueError as err:  # BadRequestError or an invalid run config
        log.error("refusing a malformed %s request: %s", kind, err)
        return _message(msg, Reply(kind, Status.FAILED, reason=Reason.BAD_REQUEST))
    try:
        settings = settings_of(context)
    except Exception:
        log.exception("%s request: merchant settings could not be loaded", kind)
        return _message(msg, Reply(kind, Status.FAILED, reason=Reason.ERROR))
    try:
        reply = handler(cfg, request, settings)
    except Exception:
        log.exception("%s %s request failed (round %d)", settings.merchant_id, kind, request.server_round)
        reply = Reply(kind, Status.FAILED, settings.merchant_id, Reason.ERROR)
    return _message(msg, reply)


def _reply(kind: str, outcome: merchant.RoundOutcome | merchant.EvalOutcome, **values: Any) -> Reply:
    """The reply of an outcome: its status, fixed reason and ε; `values` what its kind releases."""
    status = Status(outcome.status)
    metrics = {"epsilon": outcome.epsilon, "delta": outcome.delta, **values.pop("metrics", {})}
    return Reply(kind, status, outcome.merchant_id, _reason(status, outcome.code), metrics=metrics, **values)


def _train(cfg: MerchantPlan, request: protocol.Request, settings: MerchantSettings) -> Reply:
    outcome = merchant.train_round(
        settings, cfg, request.adapter, server_round=request.server_round, run_id=request.run_key
    )
    # the run's public size and the charge's public parameters, when it trained
    trained = (
        {"examples": float(outcome.examples), **outcome.metrics}
        if outcome.status == Status.TRAINED.value
        else {}
    )
    # the adapter went through the outgoing guard; the privacy record holds words from a fixed set
    return _reply(protocol.TRAIN, outcome, metrics=trained, adapter=outcome.adapter, privacy=outcome.privacy)


def _evaluate(cfg: MerchantPlan, request: protocol.Request, settings: MerchantSettings) -> Reply:
    outcome = merchant.evaluate_round(
        settings, cfg, request.adapter, server_round=request.server_round, run_id=request.run_key
    )
    # Only noisy histograms (charged) and their noisy count, with the mechanism's σ (a public setting:
    # the coordinator reports how far it moves each pooled metric); exact metrics stay local.
    released = (
        {"examples": float(outcome.examples), "eval_noise_multiplier": settings.eval_noise_multiplier}
        if outcome.histograms
        else {}
    )
    histograms = {name: h.to_values() for name, h in outcome.histograms.items()}
    return _reply(protocol.EVALUATE, outcome, metrics=released, histograms=histograms)


def train(msg: Message, context: Context, settings_of: SettingsOf = node_settings) -> Message:
    """Answer a training message as the merchant `settings_of(context)` names."""
    return _answer(msg, context, _train, protocol.TRAIN, settings_of)


def evaluate(msg: Message, context: Context, settings_of: SettingsOf = node_settings) -> Message:
    """Answer an evaluation message as the merchant `settings_of(context)` names."""
    return _answer(msg, context, _evaluate, protocol.EVALUATE, settings_of)


def build_client_app(settings_of: SettingsOf = node_settings) -> ClientApp:
    """A ClientApp whose merchants' settings come from `settings_of`. Deployed: `app` below, each
    SuperNode's node config. A simulation passes its own (`simulations.run.SimulatedMerchants`): the
    ClientApp knows nothing of simulated shops."""
    client_app = ClientApp()

    @client_app.train()
    def _train_message(msg: Message, context: Context) -> Message:
        return train(msg, context, settings_of)

    @client_app.evaluate()
    def _evaluate_message(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, settings_of)

    return client_app


app = build_client_app()
"""What a merchant's SuperNode runs (`clientapp = "client.app:app"` in pyproject.toml)."""
