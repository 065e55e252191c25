"""Ingest of each supported format from small fixture files, and the errors for a wrong format/mapping."""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.cli import add_ingest_cli
from client.ingest import IngestError, ingest
from shared.cli import parse_pairs
from tests.ingest_helpers import check_accounting, data_lines, digest, quarantine, store, write

T0 = 1511544070  # 2017-11-24T17:21:10Z

TAOBAO = "\n".join(
    [
        f"1,100,7,pv,{T0}",
        f"1,101,7,cart,{T0 + 600}",
        f"1,101,7,buy,{T0 + 600 + 1801}",  # more than 30 minutes later: a new session
        f"2,200,8,fav,{T0 + 5}",
        f"1,100,7,pv,{T0}",  # exact duplicate of row 1
        f"3,300,9,teleport,{T0}",
        "4,400,9,pv,not-a-time",
        "5,500,9,pv",
        f"6,600,9,pv,{T0 * 1000}",  # milliseconds where seconds are expected: year ~49800
        "",
    ]
)


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def test_taobao(tmp_path: Path) -> None:
    src = write(tmp_path / "UserBehavior.csv", TAOBAO)
    report = ingest(src, "taobao", tmp_path / "out")
    check_accounting(report, tmp_path / "out", {"UserBehavior.csv": 9})
    rows = store(tmp_path / "out")
    assert [(r["customer_id"], r["behavior"], r["item_id"], r["category"]) for r in rows] == [
        ("1", "view", "100", "7"),
        ("1", "cart", "101", "7"),
        ("1", "buy", "101", "7"),
        ("2", "fav", "200", "8"),
    ]
    assert rows[0]["timestamp"] == utc(T0)
    assert [r["session_id"] for r in rows] == [
        f"1:{T0}000",
        f"1:{T0}000",
        f"1:{T0 + 2401}000",
        f"2:{T0 + 5}000",
    ]
    assert report.sessions == 3 and report.customers == 2
    reasons = {r["source_row"]: (r["reason"], r["detail"], r["raw"]) for r in quarantine(tmp_path / "out")}
    assert reasons[5] == ("duplicate", "duplicate of row 1", reasons[5][2])
    assert reasons[6][0] == "unknown_behavior" and "behavior_type='teleport'" in reasons[6][1]
    assert reasons[7][0] == "bad_timestamp" and reasons[7][2] == "4,400,9,pv,not-a-time"
    assert reasons[8] == ("unparseable", "expected 5 fields, found 4", "5,500,9,pv")
    assert reasons[9][0] == "timestamp_out_of_range"
    saved = json.loads((tmp_path / "out" / "ingest-report.json").read_text())
    assert saved["total"] == 9 and saved["reasons"] == report.reasons


def test_retailrocket_with_categories(tmp_path: Path) -> None:
    src = write(
        tmp_path / "events.csv",
        "timestamp,visitorid,event,itemid,transactionid\r\n"
        "1433221332117,257597,view,355908,\r\n"
        "1433221999827,257597,addtocart,10572,\r\n"
        "1433222955914,257597,transaction,10572,4000\r\n"
        "1433221955914,,view,3,\r\n",
    )
    cats = write(tmp_path / "cats.csv", "itemid,categoryid\n355908,1173\n10572,42\n")
    props = write(
        tmp_path / "props.csv",
        "timestamp,itemid,property,value\n1,355908,categoryid,1\n5,355908,categoryid,99\n3,10572,790,n5.0\n",
    )
    report = ingest(src, "retailrocket", tmp_path / "a", mapping={"categories": str(cats)})
    check_accounting(report, tmp_path / "a", {"events.csv": 4})
    rows = store(tmp_path / "a")
    assert [(r["behavior"], r["category"]) for r in rows] == [("view", "1173"), ("cart", "42"), ("buy", "42")]
    assert rows[0]["timestamp"] == utc(1433221332.117)
    assert len({r["session_id"] for r in rows}) == 1
    assert quarantine(tmp_path / "a")[0]["reason"] == "missing_customer_id"
    ingest(src, "retailrocket", tmp_path / "b", mapping={"categories": str(props)})
    assert [r["category"] for r in store(tmp_path / "b")] == ["99", None, None]  # latest value wins


def test_yoochoose_clicks_and_buys(tmp_path: Path) -> None:
    write(
        tmp_path / "yoochoose-clicks.dat",
        "1,2014-04-07T10:51:09.277Z,214536502,0\n"
        "1,2014-04-07T10:54:09.868Z,214536500,S\n"
        "2,2014-04-06T10:54:09.000Z,214536506,3\n"
        "2,yesterday,214536506,3\n",
    )
    write(
        tmp_path / "yoochoose-buys.dat",
        "1,2014-04-07T11:00:00.000Z,214536502,1200,1\n2,2014-04-06T11:00:00.000Z,214536506,0,0\n"
        "3,2014-04-06T11:00:00.000Z,214,-5,1\n",
    )
    report = ingest(tmp_path, "yoochoose", tmp_path / "out")
    files = {"yoochoose-clicks.dat": 4, "yoochoose-buys.dat": 3}

    def file_of(row: dict[str, object]) -> str:
        return "yoochoose-clicks.dat" if row["behavior"] == "view" else "yoochoose-buys.dat"

    check_accounting(report, tmp_path / "out", files, file_of)
    rows = store(tmp_path / "out")
    assert {(r["customer_id"], r["session_id"]) for r in rows} == {("1", "1"), ("2", "2")}
    clicks = [r for r in rows if r["behavior"] == "view"]
    assert [r["category"] for r in clicks] == [None, "S", "3"]  # "0" means unknown
    assert clicks[0]["timestamp"] == utc(1396867869.277)
    assert sorted((r["price"] is None, r["price"]) for r in rows if r["behavior"] == "buy") == [
        (False, 1200.0),
        (True, None),  # price 0 means unknown in this dataset
    ]
    assert report.session_mode == "source" and report.sessions == 2
    bad = {(r["source_file"], r["reason"]) for r in quarantine(tmp_path / "out")}
    assert bad == {("yoochoose-clicks.dat", "bad_timestamp"), ("yoochoose-buys.dat", "negative_price")}


SHOP_CSV = (
    "user;when;what;sku;cost;name;q\n"
    'u1;2024-06-01T10:00:00+02:00;Product_View;A;9.5;"Phone; black";\n'
    'u1;2024-06-01 08:05:00;add_to_cart;A;9.5;"Phone; black";\n'
    "u1;1717236000;search;;;;red phone\n"
    "u2;1717236000000;purchase;B;-1;x;\n"
    "u3;1717236000;teleport;C;1;y;\n"
    "u4;1717236000;purchase;;1;y;\n"
    "u5;1717236000;search;;;;\n"
    "u6;1717236000;purchase;B;1,5;x;\n"
)
SHOP_MAP = {
    "customer_id": "user",
    "timestamp": "when",
    "behavior": "what",
    "item_id": "sku",
    "price": "cost",
    "title": "name",
    "query": "q",
}
SHOP_BEHAVIORS = {"product_view": "view", "add_to_cart": "cart", "purchase": "buy"}


def test_generic_csv(tmp_path: Path) -> None:
    src = write(tmp_path / "shop.csv", SHOP_CSV)
    report = ingest(src, "generic", tmp_path / "out", mapping=SHOP_MAP, behavior_map=SHOP_BEHAVIORS)
    check_accounting(report, tmp_path / "out", {"shop.csv": 8})
    rows = store(tmp_path / "out")
    # open vocabulary: the shop's names are kept; an unmapped one has role `other`; item ids and
    # query texts are optional
    assert [(r["behavior"], r["event_name"], r["title"], r["query"]) for r in rows] == [
        ("view", "Product_View", "Phone; black", None),
        ("cart", "add_to_cart", "Phone; black", None),
        ("search", "search", None, "red phone"),
        ("other", "teleport", "y", None),
        ("buy", "purchase", "y", None),
        ("search", "search", None, None),
    ]
    assert rows[0]["timestamp"] == rows[1]["timestamp"].replace(minute=0)  # +02:00 and naive UTC agree
    assert rows[2]["timestamp"] == utc(1717236000) and rows[0]["price"] == 9.5
    reasons = {r["source_row"]: r["reason"] for r in quarantine(tmp_path / "out")}
    assert reasons == {4: "negative_price", 8: "bad_price"}
    assert report.unmapped_events == {"teleport": 1}
    assert report.roles == {"view": 1, "cart": 1, "search": 2, "other": 1, "buy": 1}


def test_generic_csv_strict_quarantines_unmapped_names(tmp_path: Path) -> None:
    src = write(tmp_path / "shop.csv", SHOP_CSV)
    report = ingest(src, "csv", tmp_path / "out", mapping=SHOP_MAP, behavior_map=SHOP_BEHAVIORS, strict=True)
    check_accounting(report, tmp_path / "out", {"shop.csv": 8})
    reasons = {r["source_row"]: r["reason"] for r in quarantine(tmp_path / "out")}
    assert reasons == {4: "negative_price", 5: "unknown_behavior", 8: "bad_price"}
    assert report.unmapped_events == {}


def test_generic_parquet_and_jsonl(tmp_path: Path) -> None:
    table = pa.table(
        {
            "cid": [1, 1, 2, None],
            "ts": pa.array([1_700_000_000_000, 1_700_000_060_000, 1_700_000_000_000, 1], pa.timestamp("ms")),
            "kind": ["view", "buy", "cart", "view"],
            "sku": ["a", "a", "b", "c"],
            "amount": [1.5, None, 2.0, 3.0],
        }
    )
    pq.write_table(table, tmp_path / "export.parquet")
    mapping = {
        "customer_id": "cid",
        "timestamp": "ts",
        "behavior": "kind",
        "item_id": "sku",
        "price": "amount",
    }
    report = ingest(tmp_path / "export.parquet", "generic", tmp_path / "p", mapping=mapping)
    check_accounting(report, tmp_path / "p", {"export.parquet": 4})
    assert [(r["customer_id"], r["price"]) for r in store(tmp_path / "p")] == [
        ("1", 1.5),
        ("1", None),
        ("2", 2.0),
    ]
    lines = [
        {"customer_id": 7, "timestamp": "2024-06-01T10:00:00Z", "behavior": "view", "item_id": "x"},
        {"customer_id": "7", "timestamp": 1717236060, "behavior": "buy", "item_id": "x", "price": 3},
        {
            "customer_id": "8",
            "timestamp": "2024-06-01T10:00:00Z",
            "behavior": "view",
            "item_id": {"nested": 1},
        },
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n\n[1, 2]\n{not json\n"
    src = write(tmp_path / "events.jsonl", text)
    report = ingest(src, "jsonl", tmp_path / "j")
    check_accounting(report, tmp_path / "j", {"events.jsonl": 6})
    assert [r["customer_id"] for r in store(tmp_path / "j")] == ["7", "7"]
    assert {r["source_row"]: r["reason"] for r in quarantine(tmp_path / "j")} == {
        3: "unparseable",
        4: "empty_row",
        5: "unparseable",
        6: "unparseable",
    }


@pytest.mark.parametrize("fmt", ["taobao", "retailrocket", "yoochoose", "csv", "jsonl"])
def test_source_is_byte_identical_after_ingest(tmp_path: Path, fmt: str) -> None:
    sources = {
        "taobao": ("UserBehavior.csv", TAOBAO),
        "retailrocket": (
            "events.csv",
            "timestamp,visitorid,event,itemid,transactionid\n1433221332117,1,view,2,\n",
        ),
        "yoochoose": ("yoochoose-clicks.dat", "1,2014-04-07T10:51:09.277Z,214536502,0\n"),
        "csv": ("shop.csv", SHOP_CSV),
        "jsonl": (
            "e.jsonl",
            '{"customer_id": "a", "timestamp": 1717236000, "behavior": "view", "item_id": "i"}\n',
        ),
    }
    name, content = sources[fmt]
    src = write(tmp_path / "in" / name, content)
    before, mtime = digest(src), os.stat(src).st_mtime_ns
    kwargs = {"mapping": SHOP_MAP, "behavior_map": SHOP_BEHAVIORS} if fmt == "csv" else {}
    ingest(src, fmt, tmp_path / "in", **kwargs)  # even with the output beside the source
    assert digest(src) == before and os.stat(src).st_mtime_ns == mtime
    assert data_lines(src.read_bytes(), header=fmt in ("retailrocket", "csv")) >= 1


def test_wrong_mapping_names_the_column(tmp_path: Path) -> None:
    src = write(tmp_path / "shop.csv", SHOP_CSV)
    with pytest.raises(IngestError, match=r"column 'usr' \(for customer_id\).*'user'.*first row: .*u1"):
        ingest(src, "csv", tmp_path / "out", mapping={**SHOP_MAP, "customer_id": "usr"})
    with pytest.raises(IngestError, match="mapping key 'customer' is not a store field"):
        ingest(src, "csv", tmp_path / "out", mapping={"customer": "user"})
    with pytest.raises(IngestError, match="no column for customer_id"):
        ingest(src, "csv", tmp_path / "out")
    with pytest.raises(IngestError, match="'teleport' is not a funnel role"):
        ingest(src, "csv", tmp_path / "out", mapping=SHOP_MAP, behavior_map={"x": "teleport"})
    assert not (tmp_path / "out" / "store").exists()


def test_wrong_format_is_explained(tmp_path: Path) -> None:
    events = write(
        tmp_path / "events.csv", "timestamp,visitorid,event,itemid,transactionid\n1433221332117,1,view,2,\n"
    )
    with pytest.raises(
        IngestError, match=r"valid taobao data.*user_id,item_id.*e\.g\. row 1: 'timestamp,visitorid"
    ):
        ingest(events, "taobao", tmp_path / "out")
    taobao = write(tmp_path / "UserBehavior.csv", TAOBAO)
    with pytest.raises(IngestError, match=r"column 'visitorid' is not in the header.*found '1,100,7,pv"):
        ingest(taobao, "retailrocket", tmp_path / "out")
    with pytest.raises(IngestError, match="unknown format"):
        ingest(taobao, "amazon", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        ingest(tmp_path / "missing.csv", "taobao", tmp_path / "out")


def test_rerun_replaces_the_store_and_leaves_no_temp_files(tmp_path: Path) -> None:
    src = write(tmp_path / "UserBehavior.csv", TAOBAO)
    ingest(src, "taobao", tmp_path / "out", batch_rows=2)
    first = store(tmp_path / "out")
    report = ingest(src, "taobao", tmp_path / "out")
    assert store(tmp_path / "out") == first
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ingest-report.json",
        "quarantine.parquet",
        "store",
    ]
    assert [Path(f).name for f in report.store_files] == [
        p.name for p in sorted((tmp_path / "out" / "store").iterdir())
    ]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "shop.csv", SHOP_CSV)
    parser = argparse.ArgumentParser(prog="fedbehavior merchant")
    add_ingest_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "ingest",
            str(src),
            "-f",
            "csv",
            "-o",
            str(tmp_path / "out"),
            "--map",
            "customer_id=user,timestamp=when",
            "--map",
            "behavior=what,item_id=sku,price=cost,query=q",
            "--behavior-map",
            "product_view→view,add_to_cart=cart,purchase:buy",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "8 rows: 6 good, 2 quarantined" in printed and "negative_price" in printed
    assert parse_pairs(["a = b, c->d", "e:f"], "x") == {"a": "b", "c": "d", "e": "f"}
    with pytest.raises(ValueError, match="'oops' is not NAME=VALUE"):
        parse_pairs("a=b,oops", "--behavior-map")


def test_a_first_batch_of_bad_data_is_quarantined_not_refused(tmp_path: Path) -> None:
    src = write(
        tmp_path / "shop.csv", "who,when,did,sku,cost\n1,1717236000,buy,a,-1\n\n2,1717236000,buy,b,-3\n"
    )
    mapping = {
        "customer_id": "who",
        "timestamp": "when",
        "behavior": "did",
        "item_id": "sku",
        "price": "cost",
    }
    report = ingest(src, "csv", tmp_path / "out", mapping=mapping)
    assert (report.good, report.reasons) == (0, {"empty_row": 1, "negative_price": 2})
    empty = write(tmp_path / "empty.csv", "")
    with pytest.raises(IngestError, match="no data rows"):  # named, and nothing written (issue 21)
        ingest(empty, "taobao", tmp_path / "out2")
    assert not (tmp_path / "out2" / "store").exists()


def test_quoted_csv_with_broken_lines_keeps_row_numbers(tmp_path: Path) -> None:
    lines = [
        'u1,1717236000,view,a,"title, with comma"',
        'u2,1717236000,view,b,"unbalanced',
        "u3,1717236000,view,c,lone\rreturn",
        "u4,1717236000,view,d,plain",
        'u5,1717236000,view,e,"multi',
        'line"',
        "u6,1717236000,view,f,\xff",
    ]
    content = ("c,t,b,i,title\n" + "\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    src = write(tmp_path / "shop.csv", content.replace("\xff".encode(), b"\xff"))
    mapping = {"customer_id": "c", "timestamp": "t", "behavior": "b", "item_id": "i", "title": "title"}
    report = ingest(src, "csv", tmp_path / "out", mapping=mapping)
    check_accounting(report, tmp_path / "out", {"shop.csv": 7})
    assert [(r["source_row"], r["title"]) for r in store(tmp_path / "out")] == [
        (1, "title, with comma"),
        (4, "plain"),
    ]
    reasons = {r["source_row"]: r["reason"] for r in quarantine(tmp_path / "out")}
    assert reasons == {**dict.fromkeys([2, 3, 5, 6], "unparseable"), 7: "bad_encoding"}
