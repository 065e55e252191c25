"""`fedbehavior report`: every plot is written and embedded in a self-contained index.html, with the
run's DP settings; the plots draw the figures of metrics.jsonl."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from server.report import (
    PLOTS,
    build_report,
    plot_epsilon,
    plot_participation,
    tensorboard_scalars,
    write_tensorboard,
)
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
    assert "1.5 (run config max-grad-norm" in page and "2 completed of 2 planned" in page


def test_plots_draw_the_rows(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics_rows()
    rows[2]["merchants"]["m1"]["max_epsilon"] = 8.0
    rows[1]["merchants"]["m2"]["max_epsilon"] = 8.0  # the same budget: one line for both
    _, ax = plt.subplots()
    plot_epsilon(rows, ax)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["m1"].get_ydata()) == [2.5, 4.0] and list(lines["m2"].get_ydata()) == [3.0, 3.0]
    assert list(lines["m1, m2 budget"].get_ydata()) == [8.0, 8.0]
    _, ax = plt.subplots()
    rows[1]["merchants"]["m2"]["max_epsilon"] = 3.5  # m2's latest report is its budget
    plot_epsilon(rows, ax)
    budgets = {
        line.get_label(): line.get_ydata()[0] for line in ax.get_lines() if "budget" in line.get_label()
    }
    assert budgets == {"m1 budget": 8.0, "m2 budget": 3.5}
    _, ax = plt.subplots()
    plot_participation(rows, ax)
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
    assert heights["trained"] == [2, 1] and heights["refused-budget"] == [0, 1]
    plt.close("all")


def test_cli_report_export_predict(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run), "--tensorboard"]) == 0
    out = capsys.readouterr().out
    assert "report/index.html" in out and "report/tensorboard" in out
    assert list((run / "report" / "tensorboard").glob("events.out.tfevents.*"))
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


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard folder, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_match_metrics_jsonl(run: Path) -> None:
    pytest.importorskip("tensorboard")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    write_tensorboard(run)
    folder = write_tensorboard(run)  # a second call replaces the first's events, never doubles them
    assert folder == run / "report" / "tensorboard"
    scalars = read_scalars(folder)
    for key in ("accuracy", "macro_f1", "loss", "examples"):
        expected = [(r["round"], r["global"][key]) for r in rows]
        assert scalars[f"global/{key}"] == [(n, pytest.approx(v)) for n, v in expected]
    assert scalars["epsilon/m1"] == [(1, 2.5), (2, 4.0)] and scalars["epsilon/m2"] == [(1, 3.0), (2, 3.0)]
    assert scalars["bytes_up/m1"] == [(1, 1000), (2, 1000)] and scalars["bytes_up/m2"] == [(1, 1200), (2, 0)]
    assert scalars["bytes_up/total"] == [(1, 2200), (2, 1000)]
    assert not any(tag.startswith("bytes_down") for tag in scalars)  # this run recorded none


def test_tensorboard_missing_names_the_extra(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    assert main(["report", str(run), "--tensorboard"]) == 2
    assert "pip install 'fedbehavior[tensorboard]'" in capsys.readouterr().err


def test_epsilon_of_a_round_is_the_one_after_its_evaluation() -> None:
    rows = metrics_rows()
    rows[2]["merchants"]["m1"]["evaluation"] = {
        "status": "evaluated",
        "epsilon": 4.2,
    }  # charged after training
    got = {(tag, step): value for tag, value, step in tensorboard_scalars(rows)}
    assert (got[("epsilon/m1", 1)], got[("epsilon/m1", 2)], got[("epsilon/m2", 2)]) == (2.5, 4.2, 3.0)
    assert ("bytes_up/total", 0) not in got  # round 0 only evaluates


# ------------------------------------------ noisy metrics: own axes, bands, unreadable, the exact view


def noisy_rows(customers: int, sigma: float = 20.0, merchants: int = 4) -> list[dict[str, Any]]:
    """Rows whose `global` is pooled from noisy histograms (as the coordinator writes them)."""
    import numpy as np

    from server.metrics import pool_evaluations
    from shared.histograms import Histogram

    rows = []
    for r in range(3):
        reports = {}
        for m in range(merchants):
            rng = np.random.default_rng(10 * r + m)
            y = (rng.random(customers) < 0.3).astype(int)
            p1 = 1 / (1 + np.exp(-(rng.normal(0, 1, customers) + (0.5 + r) * y - 1.5)))
            exact = Histogram.of(y, np.stack([1 - p1, p1], axis=1))
            reports[f"m{m}"] = {"model": exact.noised(sigma, seed=r * 10 + m).to_values()}
        pooled, _ = pool_evaluations(reports, 2, noise=dict.fromkeys(reports, sigma))
        rows.append({"round": r, "time_s": float(r), "global": pooled, "merchants": {}})
    return rows


EXACT = [
    {"round": r, "merchants": 4, "model": {"auc": 0.6 + 0.1 * r, "accuracy": 0.7, "loss": 0.5}}
    for r in range(3)
]


def test_each_metric_on_its_own_axis_with_its_band_and_the_exact_view() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from server.report import plot_metrics

    fig = plt.figure()
    axes = plot_metrics(noisy_rows(5000), fig, EXACT)
    assert [ax.get_title() for ax in axes] == ["accuracy", "macro-F1", "AUC", "loss"]
    auc = axes[2]
    labels = [t.get_text() for t in auc.get_legend().get_texts()]
    assert sorted(labels) == ["95% noise band", "exact (simulation only)", "federated (noisy counts)"]
    exact_line = next(line for line in auc.get_lines() if line.get_label() == "exact (simulation only)")
    assert list(exact_line.get_ydata()) == pytest.approx([0.6, 0.7, 0.8])
    assert auc.get_ylim() == (0.0, 1.0)
    plt.close(fig)

    fig = plt.figure()
    axes = plot_metrics(noisy_rows(100), fig)  # the demo's scale: the noise swamps every metric
    for ax in axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["95% noise band", "unreadable: the noise swamps it"]  # no value drawn as a result
    plt.close(fig)


def test_coinciding_epsilon_lines_stay_visible() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics_rows()
    for row in rows[1:]:
        row["merchants"]["m2"] = dict(row["merchants"]["m1"])  # the same epsilons every round
    _, ax = plt.subplots()
    plot_epsilon(rows, ax)
    m1, m2 = (next(line for line in ax.get_lines() if line.get_label() == n) for n in ("m1", "m2"))
    assert list(m1.get_ydata()) == list(m2.get_ydata())
    assert m1.get_marker() != m2.get_marker() and m1.get_linestyle() != m2.get_linestyle()
    assert all(a != b for a, b in zip(m1.get_xdata(), m2.get_xdata(), strict=True))  # shifted apart
    assert all(abs(x - round(x)) < 0.1 for x in m1.get_xdata())  # but still at their rounds
    plt.close("all")


def test_page_reads_noisy_metrics_plainly(tmp_path: Path) -> None:
    rows = noisy_rows(100)
    rows[-1]["global"]["auc"] = 1.0  # a clipped value is never shown as a result
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "exact-metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EXACT))
    page = build_report(run).read_text(encoding="utf-8")
    headline = page.split("<b>Last round 2</b>")[1].split("</ul>")[0]
    assert "AUC unreadable (" in headline and "needs at least ~" in headline and "1.000" not in headline
    assert f"examples {rows[-1]['global']['examples']} ± 277" not in headline  # unreadable: says why
    assert "examples unreadable (the held-out count" in headline
    assert "Exact (simulation only), round 2: accuracy 0.700, AUC 0.800, loss 0.500." in page
    assert "released as noisy counts" in page and "m0 20, m1 20, m2 20, m3 20" in page
    assert '<td class="noise" title="' in page and "<th>exact AUC</th>" in page
    assert '<td class="exact">0.800</td>' in page
