"""Property tests: malformed rows thrown at every reader never crash ingest, and the books balance.

Each example builds a file from valid rows, damaged valid rows and raw garbage (stray delimiters and
quotes, carriage returns, invalid UTF-8, blank lines), with a valid first row so that the file is not
rejected as a whole, and ingests it in small batches so that chunk edges and partitions are crossed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.ingest import ingest
from tests.ingest_helpers import check_accounting, data_lines, digest, write

SETTINGS = settings(
    max_examples=int(os.environ.get("INGEST_EXAMPLES", "20")),
    derandomize=os.environ.get("INGEST_EXAMPLES") is None,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
GARBAGE = st.binary(max_size=30).filter(lambda b: b"\n" not in b) | st.text(
    alphabet=',;"\r\t 0123456789abcZ-:.é€\x00', max_size=30
).map(lambda s: s.encode("utf-8"))
BATCH_ROWS = st.sampled_from([1, 3, 1000])


def _damaged(fields: list[str], delimiter: str) -> st.SearchStrategy[bytes]:
    """A valid row with one field dropped, emptied, doubled or replaced with garbage text."""

    def damage(args: tuple[int, int, str]) -> bytes:
        kind, at, junk = args
        at %= len(fields)
        out = list(fields)
        if kind == 0:
            del out[at]
        elif kind == 1:
            out[at] = ""
        elif kind == 2:
            out.insert(at, out[at])
        else:
            out[at] = junk
        return delimiter.join(out).encode("utf-8", "surrogatepass")

    junk = st.text(alphabet='-x,"é\r 9.:', max_size=12)
    return st.tuples(st.integers(0, 3), st.integers(0, 20), junk).map(damage)


def _file(
    valid: st.SearchStrategy[list[str]], odd: st.SearchStrategy[list[str]], delimiter: str = ","
) -> st.SearchStrategy[bytes]:
    """Lines: a valid first row, then valid, odd (well-formed, bad values), damaged, duplicated or
    garbage rows; LF or CRLF line ends."""
    row = valid.map(lambda f: delimiter.join(f).encode())
    rows = valid | odd
    any_row = rows.map(lambda f: delimiter.join(f).encode()) | rows.flatmap(lambda f: _damaged(f, delimiter))
    any_row = any_row | GARBAGE | st.just(b"")
    lines = st.tuples(row, st.lists(any_row, max_size=25), st.lists(st.integers(0, 25), max_size=3))

    def build(args: tuple[bytes, list[bytes], list[int]]) -> list[bytes]:
        first, rest, repeats = args
        out = [first, *rest]
        return out + [out[i % len(out)] for i in repeats]  # exact duplicates

    return st.tuples(lines.map(build), st.sampled_from([b"\n", b"\r\n"]), st.booleans()).map(
        lambda a: a[1].join(a[0]) + (a[1] if a[2] else b"")
    )


def _ids() -> st.SearchStrategy[str]:
    return st.integers(1, 6).map(str)


def _row(*fields: st.SearchStrategy[object]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*fields).map(lambda t: [str(x) for x in t])


TAOBAO_BEHAVIORS = st.sampled_from(["pv", "buy", "cart", "fav"])
TAOBAO_TIMES = st.integers(1_511_500_000, 1_512_300_000)
ODD_TIMES = st.sampled_from(["-1", "0", "1e9", "1511544070000", "", "2017-11-25"])
ODD_NAMES = st.sampled_from(["", "teleport", "PV", "0"])


def _run(tmp: Path, name: str, content: bytes, fmt: str, header: bool, batch_rows: int, **kw: object) -> None:
    src = write(tmp / "in" / name, content)
    before = digest(src)
    report = ingest(src, fmt, tmp / "out", batch_rows=batch_rows, **kw)  # type: ignore[arg-type]
    check_accounting(report, tmp / "out", {name: data_lines(content, header)})
    assert digest(src) == before


@SETTINGS
@given(
    _file(
        _row(_ids(), _ids(), _ids(), TAOBAO_BEHAVIORS, TAOBAO_TIMES),
        _row(
            _ids() | ODD_NAMES,
            _ids() | ODD_NAMES,
            _ids(),
            TAOBAO_BEHAVIORS | ODD_NAMES,
            TAOBAO_TIMES | ODD_TIMES,
        ),
    ),
    BATCH_ROWS,
)
def test_taobao_reader(content: bytes, batch_rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run(Path(tmp), "UserBehavior.csv", content, "taobao", False, batch_rows)


RR_TIMES = st.integers(1_433_000_000_000, 1_442_000_000_000)
RR_EVENTS = st.sampled_from(["view", "addtocart", "transaction"])


@SETTINGS
@given(
    _file(
        _row(RR_TIMES, _ids(), RR_EVENTS, _ids(), st.sampled_from(["", "4000"])),
        _row(
            RR_TIMES | ODD_TIMES, _ids() | ODD_NAMES, RR_EVENTS | ODD_NAMES, _ids() | ODD_NAMES, st.just("x")
        ),
    ),
    BATCH_ROWS,
)
def test_retailrocket_reader(content: bytes, batch_rows: int) -> None:
    header = b"timestamp,visitorid,event,itemid,transactionid\n"
    with tempfile.TemporaryDirectory() as tmp:
        _run(Path(tmp), "events.csv", header + content, "retailrocket", True, batch_rows)


def _iso() -> st.SearchStrategy[str]:
    return st.integers(1_396_000_000_000, 1_412_000_000_000).map(
        lambda ms: (
            pa.scalar(ms, pa.timestamp("ms", "UTC")).as_py().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        )
    )


ODD_ISO = st.sampled_from(["2014-02-30T00:00:00Z", "2014-04-07", "yesterday", "", "1396867869"])


@SETTINGS
@given(
    _file(
        _row(_ids(), _iso(), _ids(), st.sampled_from(["0", "S", "3"])),
        _row(_ids() | ODD_NAMES, _iso() | ODD_ISO, _ids() | ODD_NAMES, ODD_NAMES),
    ),
    _file(
        _row(_ids(), _iso(), _ids(), st.sampled_from(["0", "1200"]), st.just("1")),
        _row(
            _ids() | ODD_NAMES,
            _iso() | ODD_ISO,
            _ids(),
            st.sampled_from(["-1", "x", "1e400", ""]),
            st.just("1"),
        ),
    ),
    BATCH_ROWS,
)
def test_yoochoose_reader(clicks: bytes, buys: bytes, batch_rows: int) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        write(tmp / "in" / "yoochoose-clicks.dat", clicks)
        write(tmp / "in" / "yoochoose-buys.dat", buys)
        files = {"yoochoose-clicks.dat": data_lines(clicks), "yoochoose-buys.dat": data_lines(buys)}
        report = ingest(tmp / "in", "yoochoose", tmp / "out", batch_rows=batch_rows)

        def file_of(row: dict[str, object]) -> str:
            return "yoochoose-clicks.dat" if row["behavior"] == "view" else "yoochoose-buys.dat"

        check_accounting(report, tmp / "out", files, file_of)


GENERIC_MAP = {
    "customer_id": "who",
    "timestamp": "when",
    "behavior": "did",
    "item_id": "sku",
    "price": "cost",
}
BEHAVIOR_MAP = {"product_view": "view", "purchase": "buy"}
TITLES = st.text(alphabet='ab ,;"é', max_size=8).map(lambda s: '"' + s.replace('"', '""') + '"')


@SETTINGS
@given(
    _file(
        _row(
            _ids(),
            TAOBAO_TIMES.map(str) | _iso(),
            st.sampled_from(["product_view", "PURCHASE "]),
            _ids(),
            st.sampled_from(["", "1.5"]),
            TITLES,
        ),
        _row(
            _ids() | ODD_NAMES,
            ODD_TIMES | ODD_ISO,
            st.sampled_from(["search", "jump", ""]),
            _ids() | ODD_NAMES,
            st.sampled_from(["-2", "x", "1,5"]),
            TITLES,
        ),
    ),
    BATCH_ROWS,
)
def test_generic_csv_reader(content: bytes, batch_rows: int) -> None:
    header = b"who,when,did,sku,cost,title\n"
    mapping = {**GENERIC_MAP, "title": "title"}
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            Path(tmp),
            "shop.csv",
            header + content,
            "csv",
            True,
            batch_rows,
            mapping=mapping,
            behavior_map=BEHAVIOR_MAP,
        )


def _json_line() -> st.SearchStrategy[bytes]:
    scalar = st.none() | st.booleans() | st.integers(-5, 2_000_000_000_000) | st.text(max_size=6) | _iso()
    value = scalar | st.lists(scalar, max_size=2) | st.dictionaries(st.text(max_size=2), scalar, max_size=2)
    base = st.fixed_dictionaries({"who": _ids(), "when": _iso(), "did": st.just("purchase"), "sku": _ids()})
    changes = st.dictionaries(st.sampled_from(["who", "when", "did", "sku", "cost"]), value, max_size=3)
    obj = st.tuples(base, changes).map(lambda t: {**t[0], **t[1]})
    return obj.map(lambda o: json.dumps(o).encode())


@SETTINGS
@given(st.lists(_json_line() | GARBAGE | st.just(b"[1]") | st.just(b""), max_size=25), BATCH_ROWS)
def test_jsonl_reader(lines: list[bytes], batch_rows: int) -> None:
    first = json.dumps({"who": "1", "when": 1_700_000_000, "did": "purchase", "sku": "a"}).encode()
    content = b"\n".join([first, *lines]) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            Path(tmp),
            "e.jsonl",
            content,
            "jsonl",
            False,
            batch_rows,
            mapping=GENERIC_MAP,
            behavior_map=BEHAVIOR_MAP,
        )


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["1", "2", "", None]),
            st.sampled_from(["2024-01-01T00:00:00Z", "1700000000", "yesterday", "", None]),
            st.sampled_from(["product_view", "purchase", "jump", None]),
            st.sampled_from(["a", "", None]),
            st.sampled_from([1.5, -1.0, float("nan"), None]),
        ),
        min_size=1,
        max_size=30,
    ),
    BATCH_ROWS,
)
def test_parquet_reader(rows: list[tuple[object, ...]], batch_rows: int) -> None:
    rows = [("1", "1700000000", "purchase", "a", 1.0), *rows]
    table = pa.table(
        {name: [r[i] for r in rows] for i, name in enumerate(["who", "when", "did", "sku", "cost"])}
    )
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "in").mkdir()
        pq.write_table(table, tmp / "in" / "x.parquet", row_group_size=4)
        report = ingest(
            tmp / "in" / "x.parquet",
            "parquet",
            tmp / "out",
            batch_rows=batch_rows,
            mapping=GENERIC_MAP,
            behavior_map=BEHAVIOR_MAP,
        )
        check_accounting(report, tmp / "out", {"x.parquet": len(rows)})
