"""End to end: Flower simulation of 3 merchants × 2 rounds on a tiny BERT, then check every artefact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from shared.adapters import AdapterSpec, extract_adapter
from shared.privacy import Charge, epsilon_of


@pytest.fixture(scope="module")
def run_dir(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.run import simulate

    overrides = {
        "backbone": tiny_bert,
        "num-rounds": 2,
        "min-train-nodes": 3,
        "min-evaluate-nodes": 3,
        "min-available-nodes": 3,
        "runs-dir": str(tmp_path_factory.mktemp("runs")),
        "run-name": "e2e",
        "sim-customers": 60,
        "batch-size": 16,
        "max-length": 32,
        "lora-r": 2,
        # the LoRA path end to end (the default, head-only, runs in make demo and the deploy tests)
        "trainable": "lora+head",
    }
    return simulate(overrides, merchants=3)


@pytest.mark.slow
def test_metrics_rows(run_dir: Path, tiny_bert: str) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # round 0: no training, each merchant's evaluation and its local baseline (noisy histograms)
    assert {m["status"] for m in rows[0]["merchants"].values()} == {"evaluated"}
    assert all("local_baseline" in m for m in rows[0]["merchants"].values())
    assert "local_baseline" in rows[0]["global"]
    model = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    for row in rows:
        g = row["global"]
        assert {"accuracy", "macro_f1", "auc", "loss", "examples"} <= set(g)
        # from noisy histograms (σ 20 per count): None where noise made a class total non-positive
        assert all(g[k] is None or 0 <= g[k] <= 1 for k in ("accuracy", "auc")) and g["examples"] >= 0
        assert row["time_s"] >= 0
    for row in rows[1:]:
        assert set(row["merchants"]) == {"merchant-0", "merchant-1", "merchant-2"}
        for m in row["merchants"].values():
            assert m["status"] == "trained"
            assert 0 < m["epsilon"] <= 8.0 and m["delta"] == 1e-6
            assert m["examples"] > 0 and "train_loss" not in m  # the exact loss stays with the merchant
            assert m["bytes_up"] > 0
    del model


@pytest.mark.slow
def test_bytes_on_the_wire_are_the_adapter(run_dir: Path, tiny_bert: str) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checkpoint = load_file(str(run_dir / "checkpoints" / "round-0001.safetensors"))
    spec = AdapterSpec({k: tuple(v.shape) for k, v in checkpoint.items()})
    assert all("lora_" in k or "classifier" in k for k in spec.shapes)
    assert any("lora_" in k for k in spec.shapes)  # this run trains LoRA + head
    for m in rows[1]["merchants"].values():
        # float32 payload of exactly the adapter tensors, plus a small header per array
        assert spec.num_bytes <= m["bytes_up"] <= spec.num_bytes + 256 * len(spec.shapes)


@pytest.mark.slow
def test_ledgers_are_within_budget_and_recomputable(run_dir: Path) -> None:
    for i in range(3):
        ledger = json.loads(
            (run_dir / "merchants" / f"merchant-{i}" / "state" / "privacy-ledger.json").read_text()
        )
        assert ledger["merchant_id"] == f"merchant-{i}"
        # evaluations of rounds 0, 1, 2 around the two training rounds, and the run's size estimate at
        # its first training round: releases of sensitivity 1 (a training charge records the clip, 1.5;
        # a small merchant's public size may give q = 1 too)
        assert [(h["round"], h["max_grad_norm"] == 1.0) for h in ledger["history"]] == [
            (0, True),
            (1, True),
            (1, False),
            (1, True),
            (2, False),
            (2, True),
        ]
        assert {h["run_id"] for h in ledger["history"]} == {"0001-e2e"}  # the merchant's own run record
        recomputed = epsilon_of([Charge.from_json(h) for h in ledger["history"]], ledger["delta"])
        assert ledger["epsilon"] == pytest.approx(recomputed)
        assert 0.9 * ledger["max_epsilon"] <= ledger["epsilon"] <= ledger["max_epsilon"]


@pytest.mark.slow
def test_final_adapter_loads_with_peft(run_dir: Path, tiny_bert: str) -> None:
    final = run_dir / "final"
    assert "epsilon" in (final / "README.md").read_text()
    base = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, str(final))
    loaded = extract_adapter(model)
    last = load_file(str(run_dir / "checkpoints" / "round-0002.safetensors"))
    assert loaded.keys() == last.keys()
    for key in last:
        torch.testing.assert_close(loaded[key], last[key])


def training_charges(run_dir: Path, merchant: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A merchant's ledger file (its own disk: an independent source) and its training charges
    (releases, the evaluations and the size estimate, record their sensitivity 1; training the clip)."""
    ledger = json.loads((run_dir / "merchants" / merchant / "state" / "privacy-ledger.json").read_text())
    return ledger, [h for h in ledger["history"] if h["max_grad_norm"] != 1.0]


@pytest.fixture(scope="module")
def privacy(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`privacy.json` of the run's export (adapter only: the provenance is the same, no merge)."""
    from server.hf_export import export_run
    from server.provenance import PRIVACY_FILE

    out = export_run(run_dir, tmp_path_factory.mktemp("export") / "adapter", adapter_only=True)
    return dict(json.loads((out / PRIVACY_FILE).read_text()))


@pytest.mark.slow
def test_privacy_json_has_each_merchant_ledger_values(run_dir: Path, privacy: dict[str, Any]) -> None:
    assert set(privacy["merchants"]) == {"merchant-0", "merchant-1", "merchant-2"}
    for name, record in privacy["merchants"].items():
        ledger, charges = training_charges(run_dir, name)
        assert [c["round"] for c in charges] == [1, 2]
        sigma = {c["noise_multiplier"] for c in charges}
        assert len(sigma) == 1  # calibrated once for the run's horizon
        assert record["noise_multiplier"] == pytest.approx(sigma.pop())
        assert record["sample_rate"] == pytest.approx(charges[-1]["sample_rate"])
        assert record["steps"] == sum(c["steps"] for c in charges)
        assert [(r["round"], r["steps"], r["sample_rate"]) for r in record["per_round"][1:]] == [
            (c["round"], c["steps"], pytest.approx(c["sample_rate"])) for c in charges
        ]
        assert (record["accountant"], record["privacy_unit"]) == (
            ledger["accountant"],
            ledger["privacy_unit"],
        )
        assert record["max_epsilon"] == ledger["max_epsilon"] and record["delta"] == ledger["delta"]
        assert record["epsilon"] == pytest.approx(ledger["epsilon"])  # after the last evaluation's charge
        assert record["rounds_trained"] == 2


@pytest.mark.slow
def test_report_of_the_run_has_every_plot_and_the_dp_values(run_dir: Path, privacy: dict[str, Any]) -> None:
    import base64
    import html
    import re

    from matplotlib.image import imread

    from server.report import PLOTS, build_report

    page = build_report(run_dir).read_text(encoding="utf-8")
    embedded = dict(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page))
    assert set(embedded) == set(PLOTS)
    for name in PLOTS:
        png = run_dir / "report" / name
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and base64.b64decode(embedded[name]) == data
        pixels = imread(png)  # decodes: a valid image, not just a signature
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0  # something drawn
    for name, record in privacy["merchants"].items():
        cells = [
            record[k] for k in ("noise_multiplier", "sample_rate", "steps", "accountant", "privacy_unit")
        ]
        shown = [f"<td>{html.escape(f'{c:.4g}' if isinstance(c, float) else str(c))}</td>" for c in cells]
        row = re.search(rf"<tr><td>{name}</td>(.*?)</tr>", page)
        assert row is not None and all(cell in row.group(1) for cell in shown), (name, shown)
    assert "not reported" not in page.split("<h2>DP settings</h2>")[1].split("<p>")[0]
