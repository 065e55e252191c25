"""Tests of shared/metrics.py against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from shared.metrics import accuracy, macro_f1, paired_auc_difference, roc_auc

SEEDS = range(25)


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    k = int(rng.integers(2, 7))
    y, p = rng.integers(0, k, n), rng.integers(0, k, n)
    assert accuracy(y, p) == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert accuracy(list(y), list(p)) == pytest.approx(accuracy_score(y, p), abs=1e-12)


def test_accuracy_edge_cases() -> None:
    assert accuracy([], []) == 0.0
    assert accuracy([1, 0, 1], [1, 0, 1]) == 1.0
    assert accuracy([1, 0, 1, 1], [0, 0, 0, 1]) == 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    k = int(rng.integers(2, 7))
    # skewed label distribution so that some classes are often missing from labels or predictions
    probs = rng.dirichlet(np.full(k, 0.5))
    y = rng.choice(k, size=n, p=probs)
    p = np.where(rng.random(n) < 0.5, y, rng.choice(k, size=n, p=probs))
    expected = f1_score(y, p, average="macro", zero_division=0)
    assert macro_f1(y, p, num_classes=k) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_ignores_classes_absent_from_both() -> None:
    y = [0, 0, 1, 1]
    p = [0, 1, 1, 1]
    # classes 2..5 appear nowhere: they must not drag the mean towards 0 (or 1)
    assert macro_f1(y, p, num_classes=6) == pytest.approx(f1_score(y, p, average="macro"))
    assert macro_f1(y, p, num_classes=6) == pytest.approx((2 / 3 + 0.8) / 2)


def test_macro_f1_class_only_predicted_counts_as_zero() -> None:
    y = [0, 0, 0]
    p = [0, 0, 2]
    assert macro_f1(y, p, num_classes=3) == pytest.approx((0.8 + 0.0) / 2)
    assert macro_f1(y, p, num_classes=3) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_macro_f1_perfect_and_empty() -> None:
    assert macro_f1([0, 1, 2, 2], [0, 1, 2, 2], num_classes=3) == 1.0
    assert macro_f1([], [], num_classes=3) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_roc_auc_matches_sklearn_with_ties(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes present
    s = rng.random(n) + 0.3 * y  # informative but overlapping
    if decimals is not None:
        s = np.round(s, decimals)  # many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_known_values() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one positive tied with one of two negatives, above the other: (1 + 0.5) / 2
    assert roc_auc([0, 0, 1], [0.2, 0.5, 0.5]) == pytest.approx(0.75)
    assert roc_auc([False, True], [0.0, 1.0]) == 1.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1, 1], [1], []])
def test_roc_auc_none_with_one_class(labels: list[int]) -> None:
    assert roc_auc(labels, np.linspace(0, 1, len(labels))) is None


# --- pooled evaluation at the server (server/metrics.py, server/coordinator.py) ---------------------


def _scores(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 2 * y - 1)))
    return y, np.stack([1 - s, s], axis=1)


def test_pooled_metrics_are_those_of_the_summed_histograms() -> None:
    from server.metrics import pool_evaluations
    from shared.histograms import Histogram

    (ya, pa), (yb, pb) = _scores(1, 120), _scores(2, 40)
    reports = {
        "a": {
            "model": Histogram.of(ya, pa).to_values(),
            "local_baseline": Histogram.of(ya, pa[:, ::-1]).to_values(),
        },
        "b": {"model": Histogram.of(yb, pb).to_values()},
        "liar": {"model": [1e6] * 7},  # wrong size for a binary task: left out, never reshaped
    }
    pooled, own = pool_evaluations(reports, num_labels=2)
    everyone = Histogram.of(np.concatenate([ya, yb]), np.concatenate([pa, pb])).metrics()
    for key in ("auc", "accuracy", "macro_f1", "loss", "examples"):
        assert pooled[key] == pytest.approx(everyone[key])
    # the pooled AUC is not the mean of the two merchants' AUCs
    mean_auc = (own["a"]["evaluation"]["auc"] + own["b"]["evaluation"]["auc"]) / 2
    assert pooled["auc"] != pytest.approx(mean_auc, abs=1e-6)
    assert pooled["local_baseline"]["auc"] == pytest.approx(1 - own["a"]["evaluation"]["auc"])
    assert own["b"]["evaluation"]["examples"] == 40 and "local_baseline" not in own["b"]
    assert "liar" not in own


def test_pooled_noise_sd_uses_every_merchants_sigma() -> None:
    """noise_sd and the bands use √(σ_a² + σ_b²) per count, and only when every pooled merchant
    reported its σ (a missing one would understate the noise)."""
    from server.metrics import pool_evaluations
    from shared.histograms import Histogram
    from shared.noise_bands import analytic_sd, bands

    (ya, pa), (yb, pb) = _scores(1, 120), _scores(2, 40)
    reports = {
        "a": {"model": Histogram.of(ya, pa).to_values()},
        "b": {"model": Histogram.of(yb, pb).to_values()},
    }
    pooled, own = pool_evaluations(reports, num_labels=2, noise={"a": 3.0, "b": 4.0})
    total = Histogram.of(np.concatenate([ya, yb]), np.concatenate([pa, pb]))
    assert pooled["noise_sd"] == pytest.approx(analytic_sd(total.counts, total.kind, 5.0))
    assert pooled["noise_sd"]["auc"] > analytic_sd(total.counts, total.kind, 3.0)["auc"]
    expected = bands(total.counts, total.kind, 5.0, total.metrics())
    assert pooled["bands"] == {k: b.to_record() for k, b in expected.items()}
    assert pooled["eval_noise"]["per_count_sd"] == pytest.approx(5.0)
    assert pooled["eval_noise"]["noise_multiplier"] == {"a": 3.0, "b": 4.0}
    assert pooled["examples"] == 160 and isinstance(pooled["examples"], int)
    # each merchant's own evaluation carries its own σ only
    assert own["a"]["evaluation"]["eval_noise"]["per_count_sd"] == pytest.approx(3.0)
    partial, _ = pool_evaluations(reports, num_labels=2, noise={"a": 3.0})
    assert "noise_sd" not in partial and "bands" not in partial


def test_noisy_pooled_counts_are_rounded_and_flagged() -> None:
    """A demo-sized evaluation at σ = 20: the pooled metrics stay in the row (the contract) with
    bands that say the noise swamps them, and the example count is a whole number."""
    from server.metrics import format_row, pool_evaluations
    from shared.histograms import Histogram

    reports = {}
    for i in range(4):
        y, p = _scores(10 + i, 100)
        reports[f"m{i}"] = {"model": Histogram.of(y, p).noised(20.0, seed=i).to_values()}
    pooled, _ = pool_evaluations(reports, num_labels=2, noise={f"m{i}": 20.0 for i in range(4)})
    assert isinstance(pooled["examples"], int)
    assert {k for k, b in pooled["bands"].items() if not b["readable"]} == {
        "accuracy",
        "macro_f1",
        "auc",
        "loss",
        "examples",
    }
    assert all(b["reason"] for b in pooled["bands"].values())
    line = format_row({"round": 1, "time_s": 2.0, "global": pooled, "merchants": {}})
    assert line.count("unreadable") == 4 and "1.000" not in line and "0.000" not in line
    assert f"{pooled['examples']} ±277" in line  # a count shows its noise itself


def test_console_table_cells() -> None:
    """Readable values print with their noise sd; rows without noise information print plainly, and
    rows written before `bands` existed are read from their `noise_sd`."""
    from server.metrics import CELL, METRIC_COLUMNS, format_row, header
    from shared.noise_bands import band_of

    merchants = {"m1": {"status": "trained", "epsilon": 2.5}, "m2": {"status": "refused-budget"}}
    readable = {
        k: band_of(k, v, sd).to_record()
        for k, v, sd in (("accuracy", 0.75, 0.02), ("macro_f1", 0.6, 0.03), ("auc", 0.8, 0.04))
    }
    readable["loss"] = band_of("loss", 0.47, 0.31).to_record()  # sd above the threshold
    readable["examples"] = band_of("examples", 4100.0, 208.0).to_record()
    g = {"accuracy": 0.75, "macro_f1": 0.6, "auc": 0.8, "loss": 0.47, "examples": 4100, "bands": readable}
    line = format_row({"round": 3, "time_s": 12.0, "global": g, "merchants": merchants})
    assert "0.750 ±0.020" in line and "0.800 ±0.040" in line and "4100 ±208" in line
    assert line.count("unreadable") == 1 and "0.470" not in line and "2.50" in line
    plain = format_row(
        {"round": 0, "time_s": 1.0, "global": {"accuracy": 0.5, "examples": 20.0}, "merchants": {}}
    )
    assert "0.500" in plain and "±" not in plain and "unreadable" not in plain
    old = {"accuracy": 1.0, "auc": None, "loss": 0.0, "examples": 173.7}
    old["noise_sd"] = {"accuracy": 0.3, "macro_f1": None, "auc": None, "loss": 0.9}
    line = format_row({"round": 1, "time_s": 1.0, "global": old, "merchants": {}})
    assert line.count("unreadable") == 4 and "1.000" not in line and " 174 " in line
    columns, legend = header().split("\n")
    assert len(columns.split()) == 5 + len(METRIC_COLUMNS) + 5  # examples, "max ε", "time s"
    assert "unreadable" in legend and "noise sd" in legend
    assert len(line) == len(columns) and CELL == 13


def test_round_follower_prints_each_new_complete_row(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io
    import json

    from server.metrics import RoundFollower, format_row, header

    path = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    follower = RoundFollower(path, out)
    assert follower.poll() == 0 and out.getvalue() == ""  # no file yet
    rows = [{"round": r, "time_s": float(r), "global": {"accuracy": 0.5}, "merchants": {}} for r in range(3)]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:10])  # row 1 half written
    assert follower.poll() == 1
    with path.open("w") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    assert follower.poll() == 2 and follower.poll() == 0
    assert out.getvalue() == header() + "\n" + "".join(format_row(r) + "\n" for r in rows)


def test_coordinator_writes_pooled_and_per_merchant_rows(tiny_bert: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    from collections.abc import Sequence

    from server.coordinator import Coordinator, Reply
    from shared.config import RunConfig
    from shared.histograms import Histogram

    data = {1: _scores(3, 80), 2: _scores(4, 60)}

    class Federation:
        def node_ids(self, minimum: int) -> list[int]:
            return [1, 2, 3]

        def train(self, nodes: Sequence[int], adapter, cfg, server_round):  # type: ignore[no-untyped-def]
            moved = {k: v + 0.01 for k, v in adapter.items()}
            metrics = {"epsilon": 1.0, "delta": 1e-6, "examples": 50.0}
            return [Reply(n, "trained", f"m{n}", moved, metrics) for n in nodes]

        def evaluate(self, nodes: Sequence[int], adapter, cfg, server_round):  # type: ignore[no-untyped-def]
            replies = []
            for n in nodes:
                if n == 3:  # over its max-evaluations-per-run
                    replies.append(Reply(n, "refused-budget", "m3", None, {"epsilon": 2.0, "delta": 1e-6}))
                    continue
                y, p = data[n]
                hist = {"model": Histogram.of(y, p).to_values()}
                if server_round == 0:
                    hist["local_baseline"] = Histogram.of(y, p).to_values()
                replies.append(
                    Reply(
                        n,
                        "evaluated",
                        f"m{n}",
                        None,
                        {"epsilon": 1.0, "delta": 1e-6, "examples": 1.0},
                        histograms=hist,
                    )
                )
            return replies

    cfg = RunConfig.parse({"backbone": tiny_bert, "num-rounds": 1, "lora-r": 2})
    run = Coordinator(cfg, Federation(), tmp_path / "run", console=False).run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    y = np.concatenate([data[1][0], data[2][0]])
    p = np.concatenate([data[1][1], data[2][1]])
    expected = Histogram.of(y, p).metrics()
    for row in rows:
        assert row["global"]["auc"] == pytest.approx(expected["auc"])
        assert row["global"]["examples"] == 140  # from the histograms, not the reported scalar
        assert row["merchants"]["m3"]["evaluation"] == {"status": "refused-budget", "epsilon": 2.0}
        assert row["merchants"]["m1"]["evaluation"]["examples"] == 80
    assert rows[0]["global"]["local_baseline"]["auc"] == pytest.approx(expected["auc"])
    assert (
        rows[0]["merchants"]["m2"]["status"] == "evaluated" and "local_baseline" in rows[0]["merchants"]["m2"]
    )
    assert rows[1]["merchants"]["m1"]["status"] == "trained" and "local_baseline" not in rows[1]["global"]


def test_wait_shows_each_round_while_it_waits(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`coordinator run --wait` prints each round as it lands, then returns the Flower status."""
    import json
    from types import SimpleNamespace

    from server.deploy import CoordinatorHome, Launch
    from server.metrics import format_row

    rows = [{"round": r, "time_s": float(r), "global": {"accuracy": 0.5}, "merchants": {}} for r in range(3)]
    polls: list[str] = []

    def flower_status(run_id: int) -> str:  # one more round lands before each poll
        polls.append("poll")
        landed = rows[: len(polls)]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in landed))
        return "finished:completed" if len(polls) == len(rows) else "running"

    home = SimpleNamespace(flower_status=flower_status)
    launch = Launch("r", 7, tmp_path)
    assert CoordinatorHome.wait(home, launch, timeout=10, poll=0.0) == "finished:completed"  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert out.count("round trained") == 1 and all(format_row(r) in out for r in rows)
    polls.clear()
    assert CoordinatorHome.wait(home, launch, timeout=10, poll=0.0, quiet=True) == "finished:completed"  # type: ignore[arg-type]
    assert capsys.readouterr().out == ""


def _two_models(rng: np.random.Generator, n: int, rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = (rng.random(n) < rate).astype(int)
    signal = y + rng.normal(0.0, 1.5, n)  # shared by both models, as two models of one customer are
    return y, signal + rng.normal(0.0, 0.5, n), np.round(signal + rng.normal(0.0, 0.5, n), 1)  # b: ties


def test_paired_auc_difference_matches_a_per_draw_loop() -> None:
    y, a, b = _two_models(np.random.default_rng(3), 80, 0.3)
    got = paired_auc_difference(y, a, b, draws=300, seed=11)
    assert got is not None
    assert got.estimate == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    # the same multiplicities, each draw expanded into a resampled dataset and scored by sklearn
    w = np.random.default_rng(11).multinomial(len(y), np.full(len(y), 1 / len(y)), size=300)
    diffs = []
    for counts in w:
        idx = np.repeat(np.arange(len(y)), counts)
        assert 0 < y[idx].sum() < len(idx)  # every draw has both classes here: none redrawn
        diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert got.low < got.estimate < got.high


def test_paired_auc_difference_of_a_model_with_itself_is_exactly_zero() -> None:
    y, a, _ = _two_models(np.random.default_rng(0), 50, 0.2)
    got = paired_auc_difference(y, a, a.copy(), draws=200)
    assert got is not None and (got.estimate, got.low, got.high) == (0.0, 0.0, 0.0)


def test_paired_auc_difference_covers_a_true_zero_about_95_percent() -> None:
    # two models of the same quality: the true difference is 0; the interval should hold it ~95% of the time
    rng = np.random.default_rng(5)
    hits = 0
    for trial in range(200):
        y, a, b = _two_models(rng, 120, 0.25)
        got = paired_auc_difference(y, a, b, draws=400, seed=trial)
        assert got is not None
        hits += got.low <= 0.0 <= got.high
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_auc_difference_sees_a_better_model() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.3).astype(int)
    good, noise = y + rng.normal(0, 0.5, 400), rng.normal(0, 1, 400)
    got = paired_auc_difference(y, good, noise)
    assert got is not None and got.low > 0.2


def test_paired_auc_difference_input_errors() -> None:
    assert paired_auc_difference([0, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) is None
    with pytest.raises(ValueError, match="differ in length"):
        paired_auc_difference([0, 1], [0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="level"):
        paired_auc_difference([0, 1], [0.1, 0.2], [0.2, 0.1], level=1.0)
