"""The model card states each merchant's privacy unit and accountant (issue 9: YooChoose's unit is a
session), from the merchants' reports when they send them, else in words. A card is a rendering of
the provenance record (`server.provenance.provenance_record` → `shared.model_card.render_card`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.export import loading
from server.provenance import NOT_REPORTED, provenance_record
from shared.config import RunConfig
from shared.model_card import FINAL, CardOptions, render_card

ROW = {"round": 3, "global": {"accuracy": 0.75, "examples": 40}}
NR = NOT_REPORTED


def model_card(cfg: RunConfig, row: dict[str, Any], merchants: dict[str, dict[str, Any]]) -> str:
    """The card of a run's final/ whose metrics.jsonl holds `row` with `merchants` in it."""
    record = provenance_record("r", [{"time_s": 1.0, **row, "merchants": merchants}], cfg)
    return render_card(record, CardOptions(kind=FINAL, loading=tuple(loading(cfg))))


def test_card_names_both_units_and_accountants() -> None:
    card = model_card(RunConfig(), ROW, {"m1": {"epsilon": 7.05, "delta": 1e-6, "status": "trained"}})
    assert "privacy unit: one customer" in card and "YooChoose" in card and "one session" in card
    assert "PLD" in card and "RDP" in card and "`accountant` in its ledger" in card
    # a merchant that reported neither: the columns say so rather than leaving a blank
    assert f"| m1 | 7.05 | 1e-06 | {NR} | {NR} | {NR} | {NR} | {NR} | 1 | trained |" in card


def test_card_shows_reported_units_per_merchant() -> None:
    merchants = {
        "shop": {"epsilon": 7.05, "delta": 1e-6, "status": "trained", "privacy_unit": "customer"},
        "yc": {
            "epsilon": 3.5,
            "delta": 1e-6,
            "status": "trained",
            "privacy_unit": "session",
            "accountant": "rdp",
        },
    }
    card = model_card(RunConfig(), ROW, merchants)
    header = "| merchant | epsilon | delta | accountant | privacy unit | noise multiplier | sample rate |"
    assert header + " steps | rounds trained | status last round |" in card
    assert f"| shop | 7.05 | 1e-06 | {NR} | customer | {NR} | {NR} | {NR} | 1 | trained |" in card
    assert f"| yc | 3.5 | 1e-06 | rdp | session | {NR} | {NR} | {NR} | 1 | trained |" in card


# ------------------------------------------ DP provenance: merchant → reply → metrics.jsonl → record

CHARGE = {"noise_multiplier": 1.25, "sample_rate": 0.125, "steps": 8.0, "max_epsilon": 8.0}


def train_reply(privacy: dict[str, str] | None, metrics: dict[str, float] | None = None) -> Any:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from shared import protocol
    from tests.test_wire_replies import GOOD_METRICS, TRAINED, _metadata, delivered

    records: dict[str, Any] = {
        protocol.METRICS: MetricRecord({**GOOD_METRICS, **CHARGE, **(metrics or {})}),  # type: ignore[dict-item]
        protocol.STATUS: ConfigRecord(TRAINED),
    }
    if privacy is not None:
        records[protocol.PRIVACY] = ConfigRecord(privacy)  # type: ignore[arg-type]
    return delivered(
        RecordDict(records), _metadata(message_id="rep", src=7, dst=0, kind="train", reply_to="r")
    )


def test_reply_dp_parameters_reach_the_row() -> None:
    from server.app import decode_reply
    from server.metrics import train_entry

    got = decode_reply(7, train_reply({"accountant": "rdp", "privacy-unit": "session"}))
    assert got.status == "trained" and got.privacy == {"accountant": "rdp", "privacy-unit": "session"}
    entry = train_entry(got.status, got.metrics, got.privacy, examples=40, bytes_up=10)
    assert {k: entry[k] for k in (*CHARGE, "accountant", "privacy_unit")} == {
        **CHARGE,
        "steps": 8,
        "accountant": "rdp",
        "privacy_unit": "session",
    }
    assert isinstance(entry["steps"], int) and (entry["examples"], entry["bytes_up"]) == (40, 10)
    older = decode_reply(7, train_reply(None))  # a merchant that sends no privacy record
    assert older.status == "trained" and older.privacy == {}
    assert train_entry("trained", older.metrics, {}, examples=1, bytes_up=1)["accountant"] is None


@pytest.mark.parametrize(
    "privacy",
    [{"accountant": "laplace"}, {"privacy-unit": "household"}, {"accountant": "pld", "note": "x"}],
)
def test_unknown_privacy_words_mark_the_reply_malformed(privacy: dict[str, str]) -> None:
    from server.app import decode_reply

    got = decode_reply(7, train_reply(privacy))
    assert (got.status, got.adapter) == ("failed", None) and got.reason.startswith("malformed reply")


@pytest.mark.parametrize(
    ("key", "value"),
    [("sample_rate", 1.5), ("sample_rate", 0.0), ("steps", 2.5), ("steps", -1.0), ("noise_multiplier", 0.0)],
)
def test_out_of_range_dp_parameters_are_recorded_as_null(key: str, value: float) -> None:
    from server.metrics import train_entry

    entry = train_entry("trained", {**CHARGE, key: value}, {}, examples=1, bytes_up=1)
    assert entry[key] is None
    assert all(entry[k] == CHARGE[k] for k in CHARGE if k != key)


def test_privacy_record_sums_steps_and_keeps_each_round_charge(tmp_path: Path) -> None:
    from server.metrics import train_entry
    from server.provenance import NOT_REPORTED, privacy_record

    def row(rnd: int, **merchants: dict[str, Any]) -> dict[str, Any]:
        return {"round": rnd, "time_s": 1.0, "global": {"accuracy": 0.5}, "merchants": merchants}

    privacy = {"accountant": "pld", "privacy-unit": "customer"}
    first = train_entry("trained", {"epsilon": 2.0, "delta": 1e-6, **CHARGE}, privacy, examples=9, bytes_up=1)
    second = train_entry(
        "trained",
        {"epsilon": 3.0, "delta": 1e-6, **CHARGE, "steps": 16.0, "sample_rate": 0.0625},
        privacy,
        examples=9,
        bytes_up=1,
    )
    refused = train_entry("refused-budget", {"epsilon": 3.0}, {}, examples=0, bytes_up=0)
    rejected = {**first, "status": "rejected-update"}  # the coordinator's verdict: still charged, released
    second["evaluation"] = {"status": "evaluated", "epsilon": 3.25}  # after the round's evaluation charge
    rows = [row(0), row(1, m1=first, m2=first, m3=first), row(2, m1=second, m2=refused, m3=rejected)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = privacy_record(tmp_path, None)["merchants"]
    # the steps of every round the merchant trained and released an update
    assert (record["m1"]["steps"], record["m2"]["steps"], record["m3"]["steps"]) == (24, 8, 16)
    assert record["m1"]["sample_rate"] == 0.0625 and record["m2"]["sample_rate"] == 0.125  # the latest
    assert (record["m1"]["accountant"], record["m1"]["privacy_unit"]) == ("pld", "customer")
    assert [r.get("steps") for r in record["m1"]["per_round"]] == [8, 16]
    assert record["m1"]["epsilon"] == 3.25 and [r["epsilon"] for r in record["m1"]["per_round"]] == [
        2.0,
        3.25,
    ]
    assert record["m2"]["per_round"][1] == {"round": 2, "status": "refused-budget", "epsilon": 3.0}
    assert record["m1"]["noise_multiplier"] == 1.25 and NOT_REPORTED not in record["m1"].values()


def test_merchant_reports_its_ledger_parameters(tmp_path: Path) -> None:
    from client.merchant import ledger_parameters
    from shared.privacy import Ledger

    ledger = Ledger.open(
        tmp_path / "l.json",
        merchant_id="m",
        delta=1e-6,
        max_epsilon=4.0,
        accountant="rdp",
        privacy_unit="session",
    )
    assert ledger_parameters(ledger) == {"accountant": "rdp", "privacy-unit": "session"}


# ------------------------------------------ what was trained, and how the metrics were released


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"trainable": "head"}, "the classifier head only (a DP linear probe over the frozen backbone"),
        (
            {"trainable": "lora+head", "lora-r": 4},
            "LoRA (rank 4, alpha 16, on query, value: A and B trained)",
        ),
        (
            {"trainable": "lora+head", "lora-mode": "ffa"},
            "FFA-LoRA (rank 8, alpha 16, on query, value: every A",
        ),
    ],
)
def test_card_says_what_was_trained(overrides: dict[str, Any], said: str) -> None:
    card = model_card(RunConfig.parse(overrides), ROW, {})
    assert f"Trained: {said}" in card


def test_card_gives_each_metric_its_noise_band_and_the_release() -> None:
    from server.metrics import with_noise
    from shared.histograms import Histogram

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p1 = 1 / (1 + np.exp(-(rng.normal(0, 1, 400) + y)))
    noisy = Histogram.of(y, np.stack([1 - p1, p1], axis=1)).noised(40.0, seed=1)
    g = with_noise(noisy.metrics(), noisy, {"m1": 20.0, "m2": 20.0, "m3": 20.0, "m4": 20.0})
    card = model_card(RunConfig(), {"round": 5, "global": g}, {})
    assert "without noise" not in card
    assert "released as noisy counts" in card and "m1 20, m2 20, m3 20, m4 20" in card
    assert "noise sd 40 per pooled count" in card
    assert "- AUC unreadable (" in card and "- accuracy unreadable (noise sd 0.56; " in card
    assert "- macro-F1 unreadable (the held-out count" in card  # its sd (11) means nothing there
    assert f"- examples unreadable (the held-out count {g['examples']} ± 277" in card
    big = {"accuracy": 0.75, "examples": 9000}
    big["bands"] = {"accuracy": {"value": 0.75, "sd": 0.01, "low": 0.73, "high": 0.77, "readable": True}}
    big["eval_noise"] = {"per_count_sd": 20.0, "noise_multiplier": {"m1": 20.0}}
    card = model_card(RunConfig(), {"round": 5, "global": big}, {})
    assert "- accuracy 0.750 ± 0.010 (95% band 0.730 to 0.770)" in card and "- examples 9000" in card


def test_card_without_noise_information_says_so() -> None:
    card = model_card(RunConfig(), ROW, {})
    assert "no noise band is given" in card and "- accuracy 0.750" in card and "- examples 40" in card
