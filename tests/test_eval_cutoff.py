"""`eval-cutoff`: the public date that `eval-split=time` splits at (issue 9, item 3)."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

import pytest

from shared.config import RunConfig, parse_cutoff

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-02-01", datetime(2026, 2, 1, tzinfo=timezone.utc)),  # a date is its midnight, UTC
        ("2026-02-01T12:30", datetime(2026, 2, 1, 12, 30, tzinfo=timezone.utc)),  # naive means UTC
        ("2026-02-01T12:30+01:00", datetime(2026, 2, 1, 11, 30, tzinfo=timezone.utc)),
        ("2026-02-01T00:00Z", datetime(2026, 2, 1, tzinfo=timezone.utc)),
    ],
)
def test_cutoff_parses_iso_dates_and_times(text: str, expected: datetime) -> None:
    parsed = parse_cutoff(text)
    assert parsed == expected and parsed.utcoffset() is not None
    cfg = RunConfig.parse({"eval-split": "time", "eval-cutoff": text})
    assert cfg.eval_cutoff_time == expected
    assert RunConfig.parse(cfg.to_record()) == cfg  # crosses the wire as the same string


def test_time_split_without_cutoff_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"eval-cutoff is required when eval-split=time"):
        RunConfig.parse({"eval-split": "time"})


@pytest.mark.parametrize("bad", ["next tuesday", "2026-13-01", "01/02/2026"])
def test_bad_cutoff_is_refused_with_the_key_and_an_example(bad: str) -> None:
    with pytest.raises(ValueError, match=r"eval-cutoff.*eval-cutoff must be an ISO date") as err:
        RunConfig.parse({"eval-split": "time", "eval-cutoff": bad})
    assert repr(bad) in str(err.value)


def test_customer_split_needs_no_cutoff() -> None:
    cfg = RunConfig.parse({})
    assert cfg.eval_cutoff == "" and cfg.eval_cutoff_time is None
    # a cut-off given with the customer split is parsed (so a typo is caught) but not used
    later = RunConfig.parse({"eval-cutoff": "2026-02-01T00:00+02:00"}).eval_cutoff_time
    assert later == datetime(2026, 2, 1, tzinfo=timezone(timedelta(hours=2)))


def test_an_unquoted_toml_date_is_read_as_the_same_cutoff() -> None:
    values = tomllib.loads('eval-split = "time"\neval-cutoff = 2026-02-01T06:00:00Z')  # a TOML datetime
    assert not isinstance(values["eval-cutoff"], str)
    cfg = RunConfig.parse(values)
    assert cfg.eval_cutoff_time == datetime(2026, 2, 1, 6, tzinfo=timezone.utc)
    assert isinstance(cfg.to_record()["eval-cutoff"], str)  # a ConfigRecord carries it as text
