"""Tests of client/ingest/data.py (load_events, quarantine, MerchantData, Encoder) and client/settings.py
(merchant settings)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from client.ingest.data import EVENTS_FILE, QUARANTINE_FILE, Encoder, LoadReport, MerchantData, load_events
from client.settings import SETTINGS_FILE, MerchantSettings, from_node_config
from shared.model import load_tokenizer
from shared.schema import Behavior, Event
from shared.tasks import get_task, split_customers
from shared.text import serialize, tokenizer_counter


def good_row(i: int, **extra: object) -> str:
    row: dict[str, object] = {
        "customer_id": f"c{i % 3}",
        "session_id": f"s{i % 5}",
        "timestamp": f"2024-06-01T10:{i:02d}:00+00:00",
        "behavior": "view",
        "item_id": f"item{i}",
    }
    row.update(extra)
    return json.dumps(row, ensure_ascii=False)


BAD_ROWS = {
    "not-json": "{this is not json",
    "missing-customer": json.dumps(
        {"session_id": "s1", "timestamp": "2024-06-01T10:00:00", "behavior": "view", "item_id": "i"}
    ),
    "negative-price": good_row(50, price=-1.0),
    "unknown-behaviour": good_row(51, behavior="teleport"),
    # item ids and query texts are optional (a page type, a search without its text); a review that
    # says nothing is not an event
    "empty-review": json.dumps(
        {"customer_id": "c1", "session_id": "s1", "timestamp": "2024-06-01T10:00:00", "behavior": "review"}
    ),
    "json-array": "[1, 2, 3]",
}


def write_events(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EVENTS_FILE
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


def test_load_events_good_and_quarantined(tmp_path: Path) -> None:
    data_dir, state_dir = tmp_path / "data", tmp_path / "state"
    lines = [
        good_row(0),
        BAD_ROWS["not-json"],
        good_row(1, behavior="pv", title="iPhone 12 手机", price=5999),
        BAD_ROWS["missing-customer"],
        "",  # blank lines are skipped but still counted in line numbers
        good_row(2, behavior="search", query="手机", item_id=None),
        BAD_ROWS["negative-price"],
        BAD_ROWS["unknown-behaviour"],
        good_row(3, behavior="review", rating=5),
        BAD_ROWS["empty-review"],
        BAD_ROWS["json-array"],
        good_row(4, behavior="buy", price=19.9),
    ]
    path = write_events(data_dir, lines)
    before = path.read_bytes()

    events, report = load_events(data_dir, state_dir)

    assert path.read_bytes() == before  # the data folder is only read
    assert report.total == 11
    assert report.good == len(events) == 5
    assert report.quarantined == 6
    assert report.good + report.quarantined == report.total
    assert sum(report.reasons.values()) == report.quarantined
    assert [e.behavior for e in events] == [
        Behavior.VIEW,
        Behavior.VIEW,
        Behavior.SEARCH,
        Behavior.REVIEW,
        Behavior.BUY,
    ]
    assert events[1].title == "iPhone 12 手机"

    quarantine = state_dir / QUARANTINE_FILE
    assert quarantine.exists()
    assert not (data_dir / QUARANTINE_FILE).exists()
    records = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()]
    assert len(records) == report.quarantined
    expected_lines = [i + 1 for i, line in enumerate(lines) if line and line in BAD_ROWS.values()]
    assert [r["line"] for r in records] == expected_lines == [2, 4, 7, 8, 10, 11]
    for r in records:
        assert isinstance(r["reason"], str)
        assert r["reason"]
        assert r["row"] == lines[r["line"] - 1]  # the raw row, for the merchant to fix
    by_line = {r["line"]: (r["reason"], r["detail"]) for r in records}
    assert by_line[2][0] == "unparseable"
    assert by_line[4][0] == "missing_customer_id" and "customer_id" in by_line[4][1]
    assert by_line[7][0] == "negative_price" and "-1" in by_line[7][1]
    assert by_line[8][0] == "unknown_behavior" and "teleport" in by_line[8][1]
    assert by_line[10][0] == "empty_review" and "rating" in by_line[10][1]
    assert by_line[11][0] == "unparseable" and "JSON object" in by_line[11][1]


def test_load_events_all_good_writes_an_empty_quarantine(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    write_events(data_dir, [good_row(i) for i in range(10)])
    events, report = load_events(data_dir, tmp_path / "state")
    assert len(events) == report.good == report.total == 10
    assert report.quarantined == 0
    assert (tmp_path / "state" / QUARANTINE_FILE).read_text(encoding="utf-8") == ""


def test_load_events_quarantine_reflects_latest_load(tmp_path: Path) -> None:
    data_dir, state_dir = tmp_path / "data", tmp_path / "state"
    write_events(data_dir, [good_row(0), BAD_ROWS["not-json"]])
    load_events(data_dir, state_dir)
    write_events(data_dir, [good_row(0), good_row(1)])
    _, report = load_events(data_dir, state_dir)
    assert report.quarantined == 0
    quarantine = state_dir / QUARANTINE_FILE
    assert not quarantine.exists() or quarantine.read_text(encoding="utf-8").strip() == ""


def test_load_events_quarantines_invalid_utf8_row(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / EVENTS_FILE).write_bytes(
        good_row(0).encode() + b"\n\xff\xfe garbage\n" + good_row(1).encode()
    )
    events, report = load_events(data_dir, tmp_path / "state")
    assert len(events) == 2
    assert report.quarantined == 1


def test_load_events_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=EVENTS_FILE):
        load_events(tmp_path, tmp_path / "state")


# --- settings -------------------------------------------------------------------------------------


def write_merchant(folder: Path, **values: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SETTINGS_FILE).write_text(json.dumps(values), encoding="utf-8")
    return folder


def test_from_merchant_dir_reads_merchant_json(tmp_path: Path) -> None:
    folder = write_merchant(
        tmp_path / "m1", merchant_id="shop-1", max_epsilon=3.5, delta=1e-7, eval_fraction=0.3
    )
    s = MerchantSettings.from_merchant_dir(folder)
    assert s.merchant_id == "shop-1"
    assert s.max_epsilon == 3.5
    assert s.delta == 1e-7
    assert s.eval_fraction == 0.3
    assert s.data_dir == folder
    assert s.state_dir == folder / "state"
    assert s.ledger_path == folder / "state" / "privacy-ledger.json"
    assert s.min_noise_multiplier == 0.3  # default


def test_from_merchant_dir_overrides_win(tmp_path: Path) -> None:
    folder = write_merchant(tmp_path / "m1", merchant_id="shop-1", max_epsilon=3.5)
    s = MerchantSettings.from_merchant_dir(folder, max_epsilon=1.0)
    assert s.max_epsilon == 1.0


def test_from_merchant_dir_invalid_json(tmp_path: Path) -> None:
    folder = tmp_path / "m1"
    folder.mkdir()
    (folder / SETTINGS_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        MerchantSettings.from_merchant_dir(folder)


def test_from_merchant_dir_without_file_needs_merchant_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"merchant-id. is required"):
        MerchantSettings.from_merchant_dir(tmp_path)


def test_from_node_config_merchant_dir(tmp_path: Path) -> None:
    folder = write_merchant(tmp_path / "m2", merchant_id="shop-2", delta=1e-5)
    s = from_node_config({"merchant-dir": str(folder)})
    assert s == MerchantSettings.from_merchant_dir(folder)
    assert s.merchant_id == "shop-2"
    assert s.delta == 1e-5
    # kebab-case keys next to merchant-dir override merchant.json
    s2 = from_node_config({"merchant-dir": str(folder), "max-epsilon": 2.0})
    assert s2.max_epsilon == 2.0


def test_from_node_config_individual_keys(tmp_path: Path) -> None:
    s = from_node_config({"merchant-id": "m", "data-dir": str(tmp_path)})
    assert s.data_dir == tmp_path
    assert s.state_dir == tmp_path / "state"


def test_from_node_config_empty_raises() -> None:
    with pytest.raises(ValueError, match="merchant-dir"):
        from_node_config({})


@pytest.mark.parametrize("delta", [1e-2, 0.05, 0.5, 0.0, -1e-6])
def test_delta_out_of_range_rejected(tmp_path: Path, delta: float) -> None:
    folder = write_merchant(tmp_path / "m", merchant_id="shop", delta=delta)
    with pytest.raises(ValueError, match="delta"):
        MerchantSettings.from_merchant_dir(folder)
    with pytest.raises(ValueError, match="delta"):
        from_node_config(
            {"merchant-dir": str(write_merchant(tmp_path / "ok", merchant_id="x")), "delta": delta}
        )


def test_delta_just_below_limit_accepted(tmp_path: Path) -> None:
    folder = write_merchant(tmp_path / "m", merchant_id="shop", delta=9.9e-3)
    assert MerchantSettings.from_merchant_dir(folder).delta == 9.9e-3


def test_unknown_setting_rejected(tmp_path: Path) -> None:
    folder = write_merchant(tmp_path / "m", merchant_id="shop", max_epsilonn=1.0)
    with pytest.raises(ValueError, match=r"unknown key .max-epsilonn"):
        MerchantSettings.from_merchant_dir(folder)


def test_relative_merchant_folder_resolves_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "merchant.json").write_text('{"merchant_id": "m", "state_dir": "st"}')
    monkeypatch.chdir(tmp_path)
    settings = MerchantSettings.from_merchant_dir(Path("shop"))
    assert settings.data_dir == tmp_path / "shop"
    assert settings.state_dir == tmp_path / "shop" / "st"  # relative to the merchant folder


# ------------------------------------------------------------------ per-customer texts (issue 9.2)

T0 = datetime(2024, 6, 1, 10, 0, tzinfo=timezone.utc)


def shared_session_id_events(customers: int, *, session_id: str = "s1", tag: str = "") -> list[Event]:
    """Every customer has one session called `session_id`; each event's title names its customer."""
    return [
        Event(
            customer_id=f"c{i:02d}",
            session_id=session_id,
            timestamp=T0 + timedelta(minutes=j),
            behavior=Behavior.VIEW,
            item_id=f"item{j}",
            title=f"{tag}owner{i:02d} gift",
        )
        for i in range(customers)
        for j in range(12)  # longer than any purchase-intent cut: every prefix has the same length
    ]


def test_training_texts_are_each_customers_own_when_session_ids_repeat(tiny_bert: str) -> None:
    events = shared_session_id_events(40)
    data = MerchantData.build(
        events, get_task("purchase-intent"), eval_fraction=0.25, salt="m", report=LoadReport()
    )
    encoder = Encoder(load_tokenizer(tiny_bert), max_length=64)
    held_out = set(data.eval_customers)
    # the reproduction: one held-out customer's text filled every training example
    encoder.text(data.evaluation()[0])
    chosen = data.train_round("r1")
    assert len(chosen) == len(data.train_customers) >= 20
    count = tokenizer_counter(encoder.tokenizer)
    for candidate in chosen:
        text = encoder.text(candidate)
        owner = candidate.customer_id[1:]
        assert f"owner{owner}" in text
        assert not any(f"owner{c[1:]}" in text for c in held_out)
        assert text == serialize(candidate.prefix, max_tokens=62, count_tokens=count)
    assert len({encoder.text(c) for c in chosen}) == len(chosen)  # one text per training customer


def test_one_encoder_keeps_merchants_with_the_same_ids_apart(tiny_bert: str) -> None:
    # a simulation process serves several merchants through one cached Encoder
    encoder = Encoder(load_tokenizer(tiny_bert), max_length=64)
    task = get_task("purchase-intent")
    texts = []
    for tag in ("shopa ", "shopb "):
        data = MerchantData.build(
            shared_session_id_events(8, tag=tag), task, eval_fraction=0.25, salt="m", report=LoadReport()
        )
        texts.append([encoder.text(c) for c in data.train_round("r1")])
    assert all("shopa" in t and "shopb" not in t for t in texts[0])
    assert all("shopb" in t and "shopa" not in t for t in texts[1])


def test_time_split_needs_a_cutoff_and_never_shares_a_customer() -> None:
    # customer i: one session a day from June 1st; held-out customers keep only sessions from June 4th
    events = [
        e.model_copy(update={"session_id": f"s{day}", "timestamp": e.timestamp + timedelta(days=day)})
        for day in range(6)
        for e in shared_session_id_events(30)
    ]
    task = get_task("purchase-intent")
    with pytest.raises(ValueError, match="eval-cutoff"):
        MerchantData.build(events, task, eval_fraction=0.25, salt="m", report=LoadReport(), split="time")
    cutoff = datetime(2024, 6, 4, tzinfo=timezone.utc)
    data = MerchantData.build(
        events, task, eval_fraction=0.25, salt="m", report=LoadReport(), split="time", cutoff=cutoff
    )
    train_ids, eval_ids = split_customers([f"c{i:02d}" for i in range(30)], eval_fraction=0.25, salt="m")
    assert data.train_customers == train_ids and data.eval_customers == eval_ids
    assert {c.session_id for cs in data.train_candidates.values() for c in cs} == {"s0", "s1", "s2"}
    assert {c.session_id for cs in data.eval_candidates.values() for c in cs} == {"s3", "s4", "s5"}
