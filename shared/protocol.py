"""The round contract between the coordinator and a merchant: request and reply types, the statuses
and reasons a reply may carry, and one codec each way. `client/app.py` and `server/app.py` speak only
through it.

Every value a reply carries is declared here (`REPLY_FIELDS`) as either

* a **DP release**: its mechanism's parameters were fixed before the merchant read any data and it
  was charged to the merchant's ledger before it left; or
* **public**: a function of public inputs only (the merchant's own settings, the approved app, the
  run plan it pinned, its ledger and run book, whose contents are themselves such functions).

`encode_reply` refuses to put anything undeclared on the wire, and README's table of released values
is generated from the declarations (`released_values_table`; a test compares them).

Flower is imported inside the codecs only, so the training core can use `Status` and `Reason`
without flwr installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from shared.privacy import ACCOUNTANTS, PRIVACY_UNITS

if TYPE_CHECKING:
    import torch
    from flwr.app import RecordDict

ARRAYS = "arrays"
CONFIG = "config"
ROUND = "round"
METRICS = "metrics"
STATUS = "status"
PRIVACY = "privacy"
HISTOGRAMS = "histograms"
PRIVACY_VALUES = {"accountant": frozenset(ACCOUNTANTS), "privacy-unit": frozenset(PRIVACY_UNITS)}
"""The `privacy` record's keys and the only words each may hold (the ledger's own vocabulary)."""

SERVER_ROUND = "server-round"
RUN_KEY = "run-key"
TRAIN, EVALUATE = "train", "evaluate"


class Status(str, Enum):
    """What a merchant says it did with a message."""

    TRAINED = "trained"
    EVALUATED = "evaluated"
    REFUSED = "refused-budget"
    FAILED = "failed"


EVALUATED = Status.EVALUATED.value


class Reason(str, Enum):
    """The only words about a refusal or failure that leave a merchant (details stay in its log)."""

    NONE = ""
    BUDGET = "budget"  # the charge would pass max-epsilon or a run / window cap
    CALIBRATION = "calibration"  # no σ under the noise ceiling fits, or δ too large for the public size
    NON_FINITE = "non-finite"  # training's output (post-processing of the DP release) is not finite
    BAD_REQUEST = "bad-request"  # unreadable message or an adapter outside the public bounds
    ERROR = "error"  # anything else (a bug; its text stays in the merchant's log)
    EVALUATION_LIMIT = "evaluation-limit"  # max-evaluations-per-run reached
    POLICY = "policy"  # the run plan is outside the merchant's [policy]
    PLAN_CHANGED = "plan-changed"  # a message of a pinned run with another plan
    RUN_LIMIT = "run-limit"  # the run's rounds, or the window's runs, are used up


Kind = Literal["dp", "public"]


@dataclass(frozen=True)
class Declared:
    """One value a reply may carry, and why releasing it is safe."""

    record: str
    key: str
    replies: tuple[str, ...]
    kind: Kind
    why: str


_BOTH = (TRAIN, EVALUATE)
REPLY_FIELDS: tuple[Declared, ...] = (
    Declared(
        STATUS,
        "status",
        _BOTH,
        "public",
        "decided before any data is read, from the message, the settings, the ledger and the run book; "
        "after the data is read only `non-finite`, a function of the DP-trained weights",
    ),
    Declared(STATUS, "reason", _BOTH, "public", "one word of `Reason`, decided as the status"),
    Declared(STATUS, "merchant-id", _BOTH, "public", "the merchant's own setting"),
    Declared(
        METRICS,
        "epsilon",
        _BOTH,
        "public",
        "the ledger's ε: composition of charges whose parameters are public or DP releases",
    ),
    Declared(METRICS, "delta", _BOTH, "public", "the merchant's own setting"),
    Declared(METRICS, "max_epsilon", (TRAIN,), "public", "the merchant's own setting"),
    Declared(
        METRICS,
        "examples",
        (TRAIN,),
        "dp",
        "the run's public training size: `declared-customers`, or a Gaussian estimate (σ "
        "size-noise-multiplier) charged once per run; never the exact count",
    ),
    Declared(
        METRICS,
        "noise_multiplier",
        (TRAIN,),
        "dp",
        "σ calibrated from the plan, the public size and earlier runs' charges",
    ),
    Declared(METRICS, "sample_rate", (TRAIN,), "dp", "q = 1/⌈size/batch⌉ of the public size"),
    Declared(METRICS, "steps", (TRAIN,), "dp", "⌈size/batch⌉ × local epochs of the public size"),
    Declared(
        ARRAYS,
        "*",
        (TRAIN,),
        "dp",
        "DP-SGD (customer-level clip, Gaussian noise over Poisson-sampled customers), charged first",
    ),
    Declared(PRIVACY, "accountant", (TRAIN,), "public", "the merchant's own setting"),
    Declared(
        PRIVACY, "privacy-unit", (TRAIN,), "public", "customer, or session for sources without customer ids"
    ),
    Declared(
        METRICS,
        "examples",
        (EVALUATE,),
        "dp",
        "the sum of the model histogram's noisy counts (post-processing), rounded",
    ),
    Declared(METRICS, "eval_noise_multiplier", (EVALUATE,), "public", "the merchant's own setting"),
    Declared(
        HISTOGRAMS,
        "model",
        (EVALUATE,),
        "dp",
        "Gaussian mechanism on the held-out histogram (sensitivity 1), charged first; released even empty",
    ),
    Declared(
        HISTOGRAMS,
        "local_baseline",
        (EVALUATE,),
        "dp",
        "output-perturbed local regression, then its noisy histogram; once per run, charged first",
    ),
)


def declared(kind_of_reply: str) -> dict[tuple[str, str], Declared]:
    return {(d.record, d.key): d for d in REPLY_FIELDS if kind_of_reply in d.replies}


def released_values_table() -> str:
    """README's table of what a merchant releases, generated from `REPLY_FIELDS`."""
    rows = ["| reply | value | kind | why it may leave |", "|---|---|---|---|"]
    for d in REPLY_FIELDS:
        value = f"`{d.record}`" if d.key == "*" else f"`{d.record}.{d.key}`"
        kind = "DP release" if d.kind == "dp" else "public"
        rows.append(f"| {', '.join(d.replies)} | {value} | {kind} | {d.why} |")
    return "\n".join(rows)


class BadRequestError(ValueError):
    """The coordinator's message could not be read (missing record, wrong type)."""


class MalformedReplyError(ValueError):
    """A merchant's reply that does not follow the protocol."""


@dataclass(frozen=True)
class Request:
    """What the coordinator sends: the run config (kebab-case values), the round, its run key and
    the global adapter."""

    config: Mapping[str, Any]
    server_round: int
    run_key: str
    adapter: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Reply:
    """What a merchant sends back. Only declared values (`REPLY_FIELDS`) may be set."""

    kind: str  # TRAIN or EVALUATE
    status: Status
    merchant_id: str = ""
    reason: Reason = Reason.NONE
    metrics: dict[str, float] = field(default_factory=dict)
    adapter: dict[str, torch.Tensor] | None = None
    histograms: dict[str, list[float]] = field(default_factory=dict)
    privacy: dict[str, str] = field(default_factory=dict)


def encode_request(request: Request) -> RecordDict:
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    return RecordDict(
        {
            ARRAYS: ArrayRecord(request.adapter),
            CONFIG: ConfigRecord(dict(request.config)),
            ROUND: ConfigRecord({SERVER_ROUND: request.server_round, RUN_KEY: request.run_key}),
        }
    )


def decode_request(content: RecordDict) -> Request:
    """A `Request`, or `BadRequestError` naming what is missing or of the wrong type."""
    try:
        config = dict(content.config_records[CONFIG])
        rnd = content.config_records[ROUND]
        server_round, run_key = rnd[SERVER_ROUND], rnd[RUN_KEY]
        if (
            isinstance(server_round, bool)
            or not isinstance(server_round, int)
            or not isinstance(run_key, str)
        ):
            raise TypeError(f"{SERVER_ROUND} must be an integer and {RUN_KEY} a string")
        adapter = content.array_records[ARRAYS].to_torch_state_dict()
    except (KeyError, TypeError, ValueError) as err:
        raise BadRequestError(f"{type(err).__name__}: {err}") from err
    return Request(config, int(server_round), run_key, adapter)


def _check_declared(reply: Reply) -> None:
    allowed = declared(reply.kind)
    wanted = [(METRICS, k) for k in reply.metrics] + [(HISTOGRAMS, k) for k in reply.histograms]
    wanted += [(PRIVACY, k) for k in reply.privacy]
    if reply.adapter is not None:
        wanted.append((ARRAYS, "*"))
    undeclared = [f"{r}.{k}" for r, k in wanted if (r, k) not in allowed]
    if undeclared:
        raise ValueError(
            f"undeclared reply values {undeclared}: declare them in shared.protocol.REPLY_FIELDS"
        )


def encode_reply(reply: Reply) -> RecordDict:
    """The reply's records. Raises `ValueError` for a value `REPLY_FIELDS` does not declare."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    _check_declared(reply)
    records: dict[str, Any] = {
        METRICS: MetricRecord(dict(reply.metrics)),  # type: ignore[arg-type]
        STATUS: ConfigRecord(
            {"status": reply.status.value, "merchant-id": reply.merchant_id, "reason": reply.reason.value}
        ),
    }
    if reply.adapter is not None:
        records[ARRAYS] = ArrayRecord(reply.adapter)
    if reply.privacy:
        records[PRIVACY] = ConfigRecord(dict(reply.privacy))  # type: ignore[arg-type]
    if reply.histograms:
        records[HISTOGRAMS] = MetricRecord(dict(reply.histograms))  # type: ignore[arg-type]
    return RecordDict(records)


MAX_TEXT_CHARS = 100  # merchant-id: a name


def decode_reply(kind: str, content: RecordDict) -> Reply:
    """A merchant's `Reply`, checked: a known status and reason, strings, finite scalar metrics of
    declared names, `examples` a whole number ≥ 0, declared histograms of finite numbers, privacy
    words from the ledger's vocabulary. Raises `MalformedReplyError`."""
    status = content.config_records.get(STATUS)
    if status is None:
        raise MalformedReplyError(f"no {STATUS!r} config record")
    code, merchant_id, reason = (status.get(k, "") for k in ("status", "merchant-id", "reason"))
    try:
        parsed_status, parsed_reason = Status(code), Reason(reason)
    except ValueError:
        raise MalformedReplyError(
            f"status {str(code)[:40]!r} / reason {str(reason)[:40]!r} is not one of the protocol's"
        ) from None
    if not isinstance(merchant_id, str):
        raise MalformedReplyError("merchant-id must be a string")
    arrays = content.array_records.get(ARRAYS)
    return Reply(
        kind=kind,
        status=parsed_status,
        merchant_id=merchant_id[:MAX_TEXT_CHARS],
        reason=parsed_reason,
        metrics=_metrics(content),
        adapter=arrays.to_torch_state_dict() if arrays is not None else None,
        histograms=_histograms(content),
        privacy=_privacy(content),
    )


def _metrics(content: RecordDict) -> dict[str, float]:
    record = content.metric_records.get(METRICS)
    if record is None:
        raise MalformedReplyError(f"no {METRICS!r} metric record")
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedReplyError(f"metric {key!r} is a {type(value).__name__}, not a number")
        if not math.isfinite(value):
            raise MalformedReplyError(f"metric {key!r} is {value}")
        metrics[key] = float(value)
    undeclared = sorted(k for k in metrics if (METRICS, k) not in _METRIC_KEYS)
    if undeclared:
        raise MalformedReplyError(f"undeclared metrics {[k[:40] for k in undeclared[:3]]}")
    examples = metrics.get("examples", 0.0)
    if examples < 0 or not examples.is_integer():
        raise MalformedReplyError(f"metric 'examples' must be a whole number >= 0, got {examples}")
    return metrics


_METRIC_KEYS = frozenset((d.record, d.key) for d in REPLY_FIELDS if d.record == METRICS)
HISTOGRAM_NAMES = frozenset(d.key for d in REPLY_FIELDS if d.record == HISTOGRAMS)


def _histograms(content: RecordDict) -> dict[str, list[float]]:
    record = content.metric_records.get(HISTOGRAMS)
    if record is None:
        return {}
    out: dict[str, list[float]] = {}
    for name, values in record.items():
        if name not in HISTOGRAM_NAMES:
            raise MalformedReplyError(f"unknown histogram {str(name)[:40]!r}")
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise MalformedReplyError(f"histogram {name!r} must be a list of finite numbers")
        out[name] = [float(v) for v in values]
    return out


def _privacy(content: RecordDict) -> dict[str, str]:
    record = content.config_records.get(PRIVACY)
    if record is None:
        return {}
    out: dict[str, str] = {}
    for key, value in record.items():
        allowed = PRIVACY_VALUES.get(key)
        if allowed is None:
            raise MalformedReplyError(f"unknown {PRIVACY!r} entry {str(key)[:40]!r}")
        if not isinstance(value, str) or value not in allowed:
            raise MalformedReplyError(f"{PRIVACY} {key!r} must be one of {sorted(allowed)}")
        out[key] = value
    return out
