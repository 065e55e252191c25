"""The privacy–utility study, reduced: utility.py end to end on 2 tiny synthetic merchants and a tiny
BERT (every arm kind, the federated one through the in-process ClientApp path), then plot.py on its
results. The local-only regression's pooled AUC is checked against an independent sklearn fit."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from shared.config import RunConfig, parse_sets
from simulations.experiments import plot, utility

ARMS = [
    "local-lr",
    "local-lora",
    "central-lr",
    "central-lora",
    "central-dp8",
    "fed-eps2",
    "fed-nodp",
    "fed-eps0.01",
]


@pytest.fixture(scope="module")
def study(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("study")
    sets = [f"backbone={tiny_bert}", "sim-customers=40", "num-rounds=1", "max-length=32", "batch-size=16"]
    argv = ["--data", "synthetic", "--merchants", "2", "--arms", ",".join(ARMS), "--out", str(out)]
    assert utility.main([*argv, *[x for s in sets for x in ("--set", s)]]) == 0
    return out, sets


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_every_arm_has_a_score(study: tuple[Path, list[str]]) -> None:
    out, _ = study
    results = {r["arm"]: r for r in rows(out) if "arm" in r}
    assert sorted(results) == sorted(ARMS)
    # a budget too small for the plan: every merchant refuses, the arm says so, the others still run
    refused = results.pop("fed-eps0.01")
    assert math.isnan(refused["auc"]) and "no merchant" in refused["refused"]
    for arm, r in results.items():
        assert 0.0 <= r["auc"] <= 1.0, arm
        assert r["examples"] == results["local-lr"]["examples"] > 0  # the same held-out customers
    assert results["fed-eps2"]["epsilon"] == 2.0 and results["fed-nodp"]["epsilon"] is None
    assert all(s == ["trained"] for rnd in results["fed-eps2"]["rounds"][1:] for s in [rnd["statuses"]])
    assert results["central-dp8"]["noise_multiplier"] > 0 and results["central-lora"]["noise_multiplier"] == 0
    assert sorted(results["local-lora"]["merchant_auc"]) == sorted(results["local-lr"]["merchant_auc"])
    # each merchant spends the arm's budget, not the default 8 (merchant.json is the merchant's own)
    ledgers = sorted((out / "fed-eps2" / "merchants").glob("*/state/privacy-ledger.json"))
    assert len(ledgers) == 2
    for ledger in ledgers:
        assert 1.5 < json.loads(ledger.read_text())["epsilon"] <= 2.0 + 1e-9


def _features(candidates: list) -> list[dict[str, float]]:
    # the regression's inputs, written again: log(1 + count) of each event name, and of the length
    out = []
    for c in candidates:
        counts = Counter(e.event_name or e.behavior.value for e in c.prefix)
        out.append({**{k: math.log1p(v) for k, v in counts.items()}, " length": math.log1p(len(c.prefix))})
    return out


def test_local_lr_matches_an_independent_fit(study: tuple[Path, list[str]], tiny_bert: str) -> None:
    out, sets = study
    cfg = RunConfig.parse(parse_sets(sets))
    folders = sorted((out / "merchants").iterdir())
    merchants = utility.load_merchants(folders, cfg, out / "check-scratch")
    labels, scores, per_merchant = [], [], []
    for m in merchants:
        train, held = m.train_examples(), m.data.evaluation()
        vec = DictVectorizer(sparse=False)
        x = vec.fit_transform(_features(train))
        model = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(x, [c.label for c in train])
        p = model.predict_proba(vec.transform(_features(held)))[:, 1]
        y = [c.label for c in held]
        labels += y
        scores += list(p)
        per_merchant.append(roc_auc_score(y, p))
    local = next(r for r in rows(out) if r.get("arm") == "local-lr")
    assert local["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=2e-3)
    assert local["median_merchant_auc"] == pytest.approx(float(np.median(per_merchant)), abs=2e-3)


def test_plot_reads_the_results(study: tuple[Path, list[str]], tmp_path: Path) -> None:
    out, _ = study
    png = tmp_path / "eps.png"
    assert plot.main([str(out / "results.jsonl"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_arm = {r["arm"]: r["auc"] for r in rows(out) if "arm" in r}
    got = plot.read([out / "results.jsonl"])
    # the mode follows the run config's trainable default (its naming is checked below)
    mode = "head" if RunConfig.parse({}).trainable == "head" else "LoRA+head"
    fed = got.series[("synthetic", f"federated {mode}")]
    assert fed.points == {2.0: by_arm["fed-eps2"], math.inf: by_arm["fed-nodp"]}
    assert got.series[("synthetic", f"central DP {mode}")].points == {8.0: by_arm["central-dp8"]}
    assert got.baselines[("synthetic", "central-lora")] == by_arm["central-lora"]


def test_plot_families_follow_the_run_config(tmp_path: Path) -> None:
    lines = [
        {"header": {"data": "/x/ret", "config": {"trainable": "head", "lora-mode": "lora"}}},
        {"arm": "fed-eps1", "epsilon": 1.0, "auc": 0.51},
        {"header": {"data": "/x/ret", "config": {"trainable": "lora+head", "lora-mode": "ffa"}}},
        {"arm": "fed-eps8", "epsilon": 8.0, "auc": 0.6},
        {"arm": "head-sweep-nodp", "epsilon": None, "auc": 0.7},
        {"arm": "local-lr", "auc": 0.55, "median_merchant_auc": 0.53},
        {"arm": "fed-eps3", "auc": float("nan")},  # a failed arm is left out, not drawn at 0
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    got = plot.read([path])
    assert got.series[("ret", "federated head")].points == {1.0: 0.51}
    assert got.series[("ret", "federated FFA-LoRA+head")].points == {8.0: 0.6}
    assert got.series[("ret", "federated head (sweep)")].points == {math.inf: 0.7}
    assert got.baselines == {("ret", "local-lr"): 0.55, ("ret", "local-lr-median"): 0.53}
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"results\.jsonl:1"):
        plot.read([path])
