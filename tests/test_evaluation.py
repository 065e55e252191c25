"""A merchant's evaluation: charged before release, bounded per run, noisy histograms only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client import merchant
from client.evaluation.release import EVALUATION_LOG, LOCAL_BINS
from client.settings import MerchantSettings
from client.training.budget import planned_evaluation_charges
from shared.adapters import extract_adapter
from shared.config import RunConfig
from shared.histograms import Histogram
from shared.privacy import Charge, epsilon_of
from tests.tiny import small_config


def adapter_of(cfg: RunConfig, settings: MerchantSettings) -> dict[str, torch.Tensor]:
    model, *_ = merchant._prepare(settings, cfg)
    return extract_adapter(model)


def history(settings: MerchantSettings) -> list[dict]:
    return json.loads(settings.ledger_path.read_text())["history"]


def test_each_release_is_charged_and_the_baseline_goes_once(tiny_bert: str, shop: Path) -> None:
    settings = MerchantSettings.from_merchant_dir(shop, eval_noise_multiplier=7.0)
    cfg = small_config(tiny_bert)
    g = adapter_of(cfg, settings)
    first = merchant.evaluate_round(settings, cfg, g, server_round=0, run_id="run", seed=1)
    second = merchant.evaluate_round(settings, cfg, g, server_round=1, run_id="run", seed=2)
    assert set(first.histograms) == {"model", "local_baseline"} and set(second.histograms) == {"model"}
    # model histogram + baseline weights + baseline histogram, then the model histogram alone
    entries = history(settings)
    assert [(h["round"], h["run_id"], h["steps"]) for h in entries] == [
        (0, "0001-run", 3),
        (1, "0001-run", 1),
    ]
    assert all(h["noise_multiplier"] == 7.0 and h["sample_rate"] == 1.0 for h in entries)
    expected = epsilon_of([Charge(0, "x", 7.0, 1.0, 4, 1.0)], settings.delta)
    assert second.epsilon == pytest.approx(expected)  # the Gaussian mechanism four times, composed
    held_out = len(merchant._prepare(settings, cfg)[2].eval_customers)
    assert first.histograms["model"].counts.shape == (2, 24)
    # only noise (σ = 7 per count, √48·7 ≈ 48 on the total) separates the released count from the truth
    assert abs(first.histograms["model"].examples - held_out) < 6 * 7.0 * np.sqrt(48)


def test_exact_metrics_stay_in_the_merchants_own_log(tiny_bert: str, shop: Path) -> None:
    settings = MerchantSettings.from_merchant_dir(shop)
    cfg = small_config(tiny_bert)
    out = merchant.evaluate_round(settings, cfg, adapter_of(cfg, settings), server_round=0, run_id="r")
    (line,) = (settings.state_dir / EVALUATION_LOG).read_text().splitlines()
    local = json.loads(line)
    held_out = len(merchant._prepare(settings, cfg)[2].eval_customers)
    assert local["model"]["examples"] == held_out and 0 <= local["model"]["auc"] <= 1
    assert "local_baseline" in local and "local_baseline_nonprivate" in local
    fine = Histogram.from_values(local["model"]["counts"], num_labels=2, bins=LOCAL_BINS)
    pos, neg = fine.counts[1], fine.counts[0]
    ties = 0.5 * float((pos * neg).sum()) / (pos.sum() * neg.sum())  # the binning error bound
    assert fine.examples == held_out and abs(fine.metrics()["auc"] - local["model"]["auc"]) <= ties + 1e-12
    assert not hasattr(out, "metrics")  # nothing exact in what the reply is built from


def test_evaluations_beyond_the_limit_are_refused_uncharged(tiny_bert: str, shop: Path) -> None:
    settings = MerchantSettings.from_merchant_dir(shop, max_evaluations_per_run=2)
    cfg = small_config(tiny_bert)
    g = adapter_of(cfg, settings)
    for r in (0, 1):
        assert merchant.evaluate_round(settings, cfg, g, server_round=r, run_id="run").status == "evaluated"
    refused = merchant.evaluate_round(settings, cfg, g, server_round=2, run_id="run")
    assert refused.status == "refused-budget" and refused.code == merchant.EVALUATION_LIMIT
    assert refused.code in merchant.WIRE_REASONS and not refused.histograms
    assert len(history(settings)) == 2
    # a new run may evaluate again (and sends its own baseline)
    again = merchant.evaluate_round(settings, cfg, g, server_round=0, run_id="next")
    assert again.status == "evaluated" and "local_baseline" in again.histograms


def test_an_exhausted_budget_refuses_to_evaluate(tiny_bert: str, shop: Path) -> None:
    settings = MerchantSettings.from_merchant_dir(shop, max_epsilon=0.1)  # below one release at σ 20
    cfg = small_config(tiny_bert)
    out = merchant.evaluate_round(settings, cfg, adapter_of(cfg, settings), server_round=0, run_id="r")
    assert out.status == "refused-budget" and out.code == merchant.BUDGET and not out.histograms
    assert not settings.ledger_path.exists() or history(settings) == []


def test_a_malformed_adapter_is_not_evaluated(tiny_bert: str, shop: Path) -> None:
    settings = MerchantSettings.from_merchant_dir(shop)
    cfg = small_config(tiny_bert)
    good = adapter_of(cfg, settings)
    key = next(iter(good))
    out = merchant.evaluate_round(settings, cfg, {**good, key: torch.zeros(3, 3)}, server_round=0, run_id="r")
    assert out.status == "failed" and out.code == merchant.BAD_REQUEST
    assert not settings.ledger_path.exists() or history(settings) == []


def test_training_reserves_the_runs_evaluations(tiny_bert: str, shop: Path) -> None:
    # a whole run at the merchant: evaluate, (train, evaluate) x 2; nothing refused, budget used
    settings = MerchantSettings.from_merchant_dir(shop, max_epsilon=3.0, eval_noise_multiplier=5.0)
    cfg = small_config(tiny_bert)
    g = adapter_of(cfg, settings)
    statuses = [merchant.evaluate_round(settings, cfg, g, server_round=0, run_id="run").status]
    for r in (1, 2):
        statuses.append(merchant.train_round(settings, cfg, g, server_round=r, run_id="run", seed=r).status)
        statuses.append(merchant.evaluate_round(settings, cfg, g, server_round=r, run_id="run").status)
    assert statuses == ["evaluated", "trained", "evaluated", "trained", "evaluated"]
    spent = epsilon_of([Charge.from_json(h) for h in history(settings)], settings.delta)
    assert 0.9 * 3.0 <= spent <= 3.0
    (reserved,) = planned_evaluation_charges("run", 2, 5.0, 11)
    assert reserved.steps == 3 + 2  # three evaluations and the baseline's two releases


def test_the_reply_carries_histograms_and_no_exact_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.app as client_app
    from server.app import decode_reply
    from shared.histograms import Histogram
    from tests.test_wire_replies import _metadata, context, delivered, request

    exact = Histogram.of([0, 1, 1], np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]))
    noisy = {"model": exact.noised(1.0, seed=0), "local_baseline": exact.noised(1.0, seed=1)}
    outcome = merchant.EvalOutcome("evaluated", "m1", 0.4, 1e-6, noisy)
    monkeypatch.setattr(merchant, "evaluate_round", lambda *a, **k: outcome)
    reply = client_app.evaluate(request("evaluate"), context(tmp_path))
    # beside the noisy count, only public parameters: its budget bookkeeping and its evaluation σ
    metrics = reply.content.metric_records["metrics"]
    assert set(metrics) == {"epsilon", "delta", "examples", "eval_noise_multiplier"}
    assert metrics["eval_noise_multiplier"] == MerchantSettings.model_fields["eval_noise_multiplier"].default
    assert reply.content.metric_records["metrics"]["examples"] == max(0, round(noisy["model"].examples))
    # as the coordinator receives it
    back = decode_reply(7, delivered(reply.content, _metadata(message_id="r", src=7, dst=0, kind="evaluate")))
    assert back.status == "evaluated" and back.histograms["model"] == noisy["model"].to_values()
    assert back.histograms["local_baseline"] == noisy["local_baseline"].to_values()


def test_a_malformed_histogram_marks_the_merchant_failed() -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from server.app import decode_reply
    from shared import protocol
    from tests.test_wire_replies import _metadata, delivered

    status = ConfigRecord({"status": "evaluated", "merchant-id": "m1", "reason": ""})
    for bad in ({"model": [1.0, float("nan")]}, {"exact_auc": [0.9]}):
        content = RecordDict(
            {
                protocol.METRICS: MetricRecord({"examples": 3}),
                protocol.STATUS: status,
                "histograms": MetricRecord(bad),
            }
        )
        reply = decode_reply(7, delivered(content, _metadata(message_id="r", src=7, dst=0, kind="evaluate")))
        assert reply.status == "failed"


def test_the_wire_audit_accepts_histograms_and_flags_anything_else() -> None:
    from server.audit import audit_problems

    def entry(values: dict) -> dict:
        return {"round": 0, "node_id": 1, "records": {"histograms": {"type": "metrics", "values": values}}}

    assert audit_problems([entry({"model": [1.5, -0.2] * 10, "local_baseline": [0.0] * 20})], {}) == []
    problems = [audit_problems([entry(v)], {}) for v in ({"texts": [1.0]}, {"model": []}, {"model": ["a"]})]
    assert "unexpected histogram 'texts'" in problems[0][0]
    assert "not a list of 1 to" in problems[1][0] and "not a number" in problems[2][0]
