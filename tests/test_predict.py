"""`predict`: one row per session (or customer) with probabilities that match an independent forward
pass, bad rows quarantined and counted as by the ingest, the same scores from final/ and an export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from client.evaluation.predict import predict
from server.hf_export import export_run
from shared.config import RunConfig
from shared.text import serialize, tokenizer_counter
from shared.trained import load_final
from tests.trained_run import make_run

HEADER = "customer_id,session_id,timestamp,behavior,title,category,price\n"
ROWS = [
    "c1,s1,2026-01-01T10:00:00Z,view,iphone 12,phones,5999",
    "c1,s1,2026-01-01T10:01:00Z,fav,iphone 12,phones,5999",
    "c1,s2,2026-01-02T09:00:00Z,search,,,",
    "c2,s3,2026-01-01T11:00:00Z,view,书,books,20",
    "c2,s3,2026-01-01T11:02:00Z,cart,书,books,20",
    "c3,s4,not-a-time,view,iphone 12,phones,5999",  # bad timestamp: quarantined
    ",s5,2026-01-01T12:00:00Z,view,iphone 12,phones,5999",  # no customer: quarantined
]


@pytest.fixture(scope="module")
def run(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("predict") / "run", tiny_bert)


@pytest.fixture()
def export_csv(tmp_path: Path) -> Path:
    path = tmp_path / "export.csv"
    path.write_text(HEADER + "\n".join(ROWS) + "\n", encoding="utf-8")
    return path


def _expected(run: Path, tiny_bert: str, texts: list[str]) -> torch.Tensor:
    """Probabilities from base + adapter on texts serialised here, padded to max-length as in training."""
    cfg = RunConfig.parse(json.loads((run / "final" / "run-config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(texts, padding="max_length", max_length=cfg.max_length, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(load_final(run / "final", cfg)(**batch).logits, dim=-1)


def test_one_row_per_session_with_bad_rows_quarantined(
    run: Path, export_csv: Path, tiny_bert: str, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    report = predict(run / "final", export_csv, out, fmt="csv")
    assert (report.total, report.good, report.quarantined, report.rows) == (7, 5, 2, 3)
    assert set(report.reasons) == {"bad_timestamp", "missing_customer_id"}
    assert Path(report.quarantine_path).name == "scores.quarantine.parquet"
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [(r["customer_id"], r["session_id"], r["events"]) for r in rows] == [
        ("c1", "s1", "2"),
        ("c1", "s2", "1"),
        ("c2", "s3", "2"),
    ]
    assert [r["in_funnel"] for r in rows] == ["False", "False", "True"]  # s3 holds a cart
    # the whole session as text, within max-length (30 event tokens + [CLS] + [SEP])
    from shared.schema import Event

    def text(events: list[dict[str, object]]) -> str:
        evs = [Event.model_validate({"customer_id": "x", "session_id": "y", **e}) for e in events]
        count = tokenizer_counter(AutoTokenizer.from_pretrained(tiny_bert))
        return serialize(evs, max_tokens=30, count_tokens=count)

    texts = [
        "view iphone 12 phones 5999 ; fav iphone 12 phones 5999",
        "search",
        "view 书 books 20 ; cart 书 books 20",
    ]
    assert text(
        [{"timestamp": "2026-01-01T11:00:00Z", "behavior": "view", "title": "书", "category": "books",
          "price": 20}, {"timestamp": "2026-01-01T11:02:00Z", "behavior": "cart", "title": "书",
                         "category": "books", "price": 20}]
    ) == texts[2]  # fmt: skip
    expected = _expected(run, tiny_bert, texts)
    got = torch.tensor([[float(r["p_no-buy"]), float(r["p_buy"])] for r in rows])
    assert torch.allclose(got, expected, atol=1e-5)
    assert [r["predicted"] for r in rows] == [("no-buy", "buy")[int(i)] for i in expected.argmax(-1)]


def test_export_scores_equal_final_scores(run: Path, export_csv: Path, tmp_path: Path) -> None:
    merged = export_run(run, tmp_path / "merged")
    a = predict(run, export_csv, tmp_path / "a.jsonl", fmt="csv", batch_size=2)
    b = predict(merged, export_csv, tmp_path / "b.jsonl", fmt="csv")
    rows_a = [json.loads(x) for x in Path(a.out).read_text().splitlines()]
    rows_b = [json.loads(x) for x in Path(b.out).read_text().splitlines()]
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["session_id"] == rb["session_id"] and ra["predicted"] == rb["predicted"]
        assert abs(ra["p_buy"] - rb["p_buy"]) < 1e-5
        assert abs(ra["p_buy"] + ra["p_no-buy"] - 1.0) < 1e-5


def test_customer_task_gives_one_row_per_customer(tiny_bert: str, export_csv: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", tiny_bert, task="repeat-purchase")
    out = tmp_path / "customers.jsonl"
    report = predict(run, export_csv, out, fmt="csv")
    # nobody in the fixture bought: every customer is skipped, none is scored
    assert report.rows == 0 and report.skipped == {"never-bought": 2}
    buys = export_csv.read_text() + "c1,s2,2026-01-02T09:05:00Z,buy,iphone 12,phones,5999\n"
    export_csv.write_text(buys)
    report = predict(run, export_csv, out, fmt="csv", overrides={"repeat-days": 10})
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["customer_id"], r["events"]) for r in rows] == [("c1", 4)]  # c1's events up to its buy
    assert set(rows[0]) == {"customer_id", "events", "predicted", "p_no-repeat", "p_repeat"}


def test_merchant_folder_and_bad_out(run: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = {"customer_id": "c1", "session_id": "s1", "timestamp": "2026-01-01T10:00:00Z", "behavior": "view"}
    (data / "events.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    report = predict(run, data, tmp_path / "s.jsonl")
    assert (report.total, report.good, report.quarantined, report.rows) == (2, 1, 1, 1)
    assert Path(report.quarantine_path).name == "s.quarantine.jsonl"
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        predict(run, data, tmp_path / "s.txt")
