"""Progress: a bar only when stderr is a terminal, else a few log lines (quarters and a final count);
training, ingest and prediction report through it."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from shared.progress import Progress, interactive, progress

LOGGER = "tests.progress"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def messages(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def test_tty_decision_follows_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", Terminal())
    assert interactive()
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe or a file: no terminal
    assert not interactive()
    assert not interactive(Closed()) and not interactive(object())  # type: ignore[arg-type]


def test_without_a_tty_logs_each_quarter_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert list(progress(range(8), "work", unit="steps", logger=logging.getLogger(LOGGER))) == list(range(8))
    assert messages(caplog, "work") == [
        "work: 2/8 steps (25%)",
        "work: 4/8 steps (50%)",
        "work: 6/8 steps (75%)",
        "work: 8/8 steps (100%)",
    ]
    assert all(r.name == LOGGER and r.levelno == logging.INFO for r in caplog.records)
    assert not pipe.getvalue()  # no bar drawn


def test_estimated_total_unknown_total_and_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = logging.getLogger(LOGGER)
    with Progress("rows", total=10, unit="rows", logger=log) as bar:  # an estimate, short by 3
        for n in (3, 3, 7):
            bar.update(n)
    assert messages(caplog, "rows") == [
        "rows: 3/10 rows (30%)",
        "rows: 6/10 rows (60%)",
        "rows: 13/10 rows (100%)",  # the quarter lines stop at 100%; the final line has the real count
        "rows: done, 13 rows",
    ]
    list(progress(iter("abc"), "letters", unit="letters", logger=log))  # no len(): one final line
    assert messages(caplog, "letters") == ["letters: done, 3 letters"]
    with pytest.raises(KeyError), Progress("broken", total=4, logger=log) as bar:
        bar.update()
        raise KeyError("x")
    assert messages(caplog, "broken") == ["broken: 1/4 it (25%)", "broken: stopped after 1 it"]


def test_with_a_tty_draws_a_bar_and_logs_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert sum(progress(range(5), "bar", unit="steps", logger=logging.getLogger(LOGGER))) == 10
    assert "bar: 100%" in terminal.getvalue() and "5/5" in terminal.getvalue()
    assert not messages(caplog, "bar")


def test_a_single_item_shows_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One batch (the scoring service's usual call) draws no bar and logs no line, TTY or not."""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = logging.getLogger(LOGGER)
    assert list(progress(range(1), "one", logger=log)) == [0]
    assert list(progress([], "none", logger=log)) == []
    assert not terminal.getvalue() and not messages(caplog, "one") and not messages(caplog, "none")


def test_ingest_reports_progress_in_log_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from client.ingest import ingest

    monkeypatch.setattr("sys.stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="client.ingest.run")
    rows = "".join(f"c{i % 3},s{i % 5},2026-01-0{1 + i % 5}T10:00:0{i % 10}Z,view\n" for i in range(20))
    source = tmp_path / "events.csv"
    source.write_text("customer_id,session_id,timestamp,behavior\n" + rows)
    report = ingest(source, "csv", tmp_path / "out")
    reading = messages(caplog, "ingest: reading")
    assert reading[-1] == f"ingest: reading: done, {report.total} rows" and report.total == 20
    assert messages(caplog, "ingest: sessions") == ["ingest: sessions: 1/1 partitions (100%)"]


def test_training_and_scoring_report_in_log_lines(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from client.evaluation.predict import predict
    from client.training.loop import DPSettings, TrainSettings, train_dp
    from tests.test_dp_training import encode, model_with_nonzero_b
    from tests.trained_run import make_run

    monkeypatch.setattr("sys.stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="client")
    settings = TrainSettings(epochs=2, batch_size=4)  # 8 examples: 2 batches per epoch, 4 steps
    result = train_dp(
        model_with_nonzero_b(tiny_bert),
        encode(tiny_bert, 8),
        settings=settings,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        device=torch.device("cpu"),
        seed=0,
    )
    assert result.steps == 4
    expected = [f"DP-SGD, 2 epoch(s): {i}/4 steps ({25 * i}%)" for i in (1, 2, 3, 4)]
    assert messages(caplog, "DP-SGD") == expected
    run = make_run(tmp_path / "run", tiny_bert)
    events = tmp_path / "events.csv"
    lines = [f"c{i},s{i},2026-01-01T10:00:00Z,view" for i in range(3)]  # three sessions
    events.write_text("customer_id,session_id,timestamp,behavior\n" + "\n".join(lines) + "\n")
    predict(run / "final", events, tmp_path / "scores.csv", fmt="csv", batch_size=1)
    assert messages(caplog, "scoring") == [
        "scoring: 1/3 batches of 1 (33%)",
        "scoring: 2/3 batches of 1 (66%)",
        "scoring: 3/3 batches of 1 (100%)",
    ]
