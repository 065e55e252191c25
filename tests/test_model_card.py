"""The model card states each merchant's privacy unit and accountant (issue 9: YooChoose's unit is a
session), from the merchants' reports when they send them, else in words."""

from __future__ import annotations

from server.export import model_card
from shared.config import RunConfig

ROW = {"round": 3, "global": {"accuracy": 0.75, "examples": 40}}


def test_card_names_both_units_and_accountants() -> None:
    card = model_card(RunConfig(), ROW, {"m1": {"epsilon": 7.05, "delta": 1e-6, "status": "trained"}})
    assert "privacy unit: one customer" in card and "YooChoose" in card and "one session" in card
    assert "PLD" in card and "RDP" in card and "`accountant` in its ledger" in card
    assert "| m1 | 7.050 | 1e-06 | trained |" in card  # no unit columns when no merchant reported them


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
    assert "| merchant | epsilon | delta | privacy unit | accountant | status in last round |" in card
    assert "| shop | 7.050 | 1e-06 | customer | - | trained |" in card
    assert "| yc | 3.500 | 1e-06 | session | rdp | trained |" in card
