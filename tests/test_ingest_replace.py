"""An ingest never loses data: an empty or header-only export, or one with fewer good rows than the
store it would replace, leaves that store as it was (issue 21), unless the merchant asks."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.ingest import IngestError, ingest
from tests.ingest_helpers import store, write
from tests.test_ingest_formats import SHOP_BEHAVIORS, SHOP_CSV, SHOP_MAP

HEADER = SHOP_CSV.splitlines()[0] + "\n"


def run(src: Path, out: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    return ingest(src, "generic", out, mapping=SHOP_MAP, behavior_map=SHOP_BEHAVIORS, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "content"), [("header-only", HEADER), ("empty", "")])
def test_an_export_without_rows_is_named_and_changes_nothing(tmp_path: Path, name: str, content: str) -> None:
    out = tmp_path / "out"
    first = run(write(tmp_path / "shop.csv", SHOP_CSV), out)
    before = store(out)
    assert first.good > 0 and before
    with pytest.raises(IngestError, match="header-only" if name == "header-only" else "is empty"):
        run(write(tmp_path / f"{name}.csv", content), out)
    assert store(out) == before  # the store is what it was


def test_a_json_array_saved_as_csv_is_named(tmp_path: Path) -> None:
    src = write(tmp_path / "export.csv", '[{"user": "u1", "what": "view"}]\n')
    with pytest.raises(IngestError, match="looks like JSON"):
        run(src, tmp_path / "out")


def test_fewer_good_rows_replace_a_store_only_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(write(tmp_path / "shop.csv", SHOP_CSV), out)
    before = store(out)
    truncated = write(tmp_path / "cut.csv", "".join(SHOP_CSV.splitlines(keepends=True)[:3]))
    with pytest.raises(IngestError, match="--replace-smaller"):
        run(truncated, out)
    assert store(out) == before
    report = run(truncated, out, replace_smaller=True)
    assert len(store(out)) == report.good < len(before)
