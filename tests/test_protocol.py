"""The round contract: every reply value declared, the privacy page's table generated from the declarations,
and the codecs round-trip what they may carry and refuse what they may not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from shared import protocol
from shared.protocol import Reason, Reply, Status

README = Path(__file__).resolve().parent.parent / "docs" / "privacy.md"


def test_the_readme_table_is_generated_from_the_declarations() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- released-values:start -->\n(.*?)\n<!-- released-values:end -->", text, re.S)
    assert found, "docs/privacy.md lacks the released-values markers"
    assert found.group(1) == protocol.released_values_table()
    assert "not covered" not in found.group(1).lower()


def test_every_declaration_says_what_it_is() -> None:
    for d in protocol.REPLY_FIELDS:
        assert d.kind in ("dp", "public") and d.why and set(d.replies) <= {protocol.TRAIN, protocol.EVALUATE}
    keys = [(d.record, d.key, r) for d in protocol.REPLY_FIELDS for r in d.replies]
    assert len(keys) == len(set(keys))  # one declaration per value per reply


def test_an_undeclared_value_never_reaches_the_wire() -> None:
    for reply in (
        Reply(protocol.TRAIN, Status.TRAINED, "m1", metrics={"train_loss": 0.3}),
        Reply(protocol.EVALUATE, Status.EVALUATED, "m1", metrics={"accuracy": 0.7}),
        Reply(protocol.EVALUATE, Status.EVALUATED, "m1", adapter={"w": torch.zeros(1)}),
        Reply(protocol.TRAIN, Status.TRAINED, "m1", histograms={"model": [1.0]}),
    ):
        with pytest.raises(ValueError, match="undeclared"):
            protocol.encode_reply(reply)


def test_a_reply_round_trips_through_the_codec() -> None:
    sent = Reply(
        protocol.TRAIN,
        Status.TRAINED,
        "m1",
        Reason.NONE,
        metrics={"epsilon": 1.5, "delta": 1e-6, "examples": 640.0, "noise_multiplier": 2.0},
        adapter={"head": torch.arange(4.0).reshape(2, 2)},
        privacy={"accountant": "pld", "privacy-unit": "customer"},
    )
    back = protocol.decode_reply(protocol.TRAIN, protocol.encode_reply(sent))
    assert (back.status, back.reason, back.merchant_id, back.metrics, back.privacy) == (
        sent.status,
        sent.reason,
        sent.merchant_id,
        sent.metrics,
        sent.privacy,
    )
    assert back.adapter is not None and torch.equal(back.adapter["head"], sent.adapter["head"])  # type: ignore[index]


def test_a_request_round_trips_and_a_bad_one_is_named() -> None:
    request = protocol.Request({"num-rounds": 3}, 2, "run-7", {"w": torch.ones(2)})
    back = protocol.decode_request(protocol.encode_request(request))
    assert (dict(back.config), back.server_round, back.run_key) == ({"num-rounds": 3}, 2, "run-7")
    content = protocol.encode_request(request)
    del content[protocol.ROUND]
    with pytest.raises(protocol.BadRequestError, match="round"):
        protocol.decode_request(content)
