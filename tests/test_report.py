"""`fedbehavior report`: every plot is written and embedded in a self-contained index.html, with the
run's DP settings; the plots draw the figures of metrics.jsonl."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from server.report import PLOTS, build_report, plot_epsilon, plot_participation
from shared.cli import main
from tests.trained_run import make_run, metrics_rows


@pytest.fixture(scope="module")
def run(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "run", tiny_bert)


def test_report_contains_every_plot_embedded(run: Path) -> None:
    index = build_report(run)
    assert index == run / "report" / "index.html"
    page = index.read_text(encoding="utf-8")
    embedded = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in embedded] == list(PLOTS)
    for name, data in embedded:
        png = (run / "report" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and base64.b64decode(data) == png
    assert 'src="http' not in page and "<script" not in page  # nothing to fetch: self-contained
    assert "DP settings" in page and "<td>m1</td><td>4</td><td>1e-06</td>" in page
    assert "1 (run config max-grad-norm" in page and "2 completed of 2 planned" in page


def test_plots_draw_the_rows(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics_rows()
    rows[2]["merchants"]["m1"]["max_epsilon"] = 8.0
    _, ax = plt.subplots()
    plot_epsilon(rows, ax)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["m1"].get_ydata()) == [2.5, 4.0] and list(lines["m2"].get_ydata()) == [3.0, 3.0]
    assert list(lines["m1 budget"].get_ydata()) == [8.0, 8.0]
    _, ax = plt.subplots()
    plot_participation(rows, ax)
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
    assert heights["trained"] == [2, 1] and heights["refused-budget"] == [0, 1]
    plt.close("all")


def test_cli_report_export_predict(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run)]) == 0
    assert "report/index.html" in capsys.readouterr().out
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "privacy.json").read_text())["merchants"]["m1"]["epsilon"] == 4.0
    data = tmp_path / "data"
    data.mkdir()
    event = {"customer_id": "c", "session_id": "s", "timestamp": "2026-01-01T10:00:00Z", "behavior": "view"}
    (data / "events.jsonl").write_text(json.dumps(event) + "\n")
    out = tmp_path / "s.csv"
    assert main(["predict", "--model", str(tmp_path / "e"), "--events", str(data), "--out", str(out)]) == 0
    assert (
        out.read_text().splitlines()[0] == "customer_id,session_id,events,in_funnel,predicted,p_no-buy,p_buy"
    )
