"""Provenance is data first: `privacy.json` is built from the run folder's data (metrics.jsonl, the run
config, exact-metrics.jsonl), never from Markdown, and every model card (a run's final/, an export, a
merchant's personalised model) is a rendering of its record by the one writer, `shared.model_card`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import client.evaluation.personalise as personalise
import server.export as final_export
import server.hf_export as hf_export
import server.provenance as provenance
from server.provenance import NOT_REPORTED, PRIVACY_FILE, privacy_record
from shared.config import RunConfig
from shared.model_card import EXPORT, FINAL, PERSONALISED, CardOptions, cell, render_card
from shared.noise_bands import LABELS

NR = NOT_REPORTED
CFG = {"num-rounds": 3, "max-grad-norm": 0.75, "task": "purchase-intent"}

ACCURACY = {"value": 0.7, "sd": 0.02, "low": 0.66, "high": 0.74, "readable": True}
AUC = {"value": 0.8, "sd": 0.3, "low": 0.2, "high": 1.0, "readable": False, "reason": "noise sd 0.30 > 0.1"}


def hand_rows() -> list[dict[str, Any]]:
    """A three-round metrics.jsonl written by hand (not through `train_entry`): merchant a reports its
    charge, accountant and unit; b is an older merchant that reports only status, epsilon, delta, steps."""
    a1 = {"status": "trained", "epsilon": 1.5, "delta": 1e-6, "steps": 10, "noise_multiplier": 1.2}
    a1 |= {"sample_rate": 0.05, "accountant": "pld", "privacy_unit": "customer", "max_epsilon": 8.0}
    a2 = a1 | {"epsilon": 2.5, "steps": 12, "sample_rate": 0.04}
    return [
        {
            "round": 0,
            "time_s": 0.1,
            "global": {"accuracy": 0.5, "examples": 30},
            "merchants": {
                "a": {"status": "evaluated", "evaluation": {"status": "evaluated", "epsilon": 0.1}}
            },
        },
        {
            "round": 1,
            "time_s": 1.0,
            "global": {"accuracy": 0.6, "examples": 30},
            "merchants": {
                "a": a1 | {"evaluation": {"status": "evaluated", "epsilon": 1.75}},
                "b": {"status": "trained", "epsilon": 2.0, "delta": 1e-5, "steps": 4},
            },
        },
        {
            "round": 2,
            "time_s": 2.0,
            "global": {
                "accuracy": 0.7,
                "auc": 0.8,
                "examples": 500,
                "bands": {"accuracy": ACCURACY, "auc": AUC},
                "eval_noise": {"per_count_sd": 5.0, "noise_multiplier": {"a": 3.0, "b": 4.0}},
            },
            "merchants": {
                "a": a2 | {"evaluation": {"status": "evaluated", "epsilon": 2.8}},
                "b": {"status": "refused-budget", "epsilon": 2.0, "delta": 1e-5},
            },
        },
    ]


def write_run(run: Path, rows: list[dict[str, Any]] | None = None) -> RunConfig:
    """A run folder's data: metrics.jsonl, exact-metrics.jsonl, final/run-config.json."""
    cfg = RunConfig.parse(CFG)
    (run / "final").mkdir(parents=True)
    lines = (json.dumps(r) + "\n" for r in (hand_rows() if rows is None else rows))
    (run / "metrics.jsonl").write_text("".join(lines))
    exact = [
        {"round": 1, "model": {"accuracy": 0.61}},
        {"round": 2, "model": {"accuracy": 0.71, "auc": 0.79}},
    ]
    (run / "exact-metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in exact))
    (run / "final" / "run-config.json").write_text(json.dumps(cfg.to_record()))
    return cfg


def test_record_of_a_hand_written_metrics_jsonl(tmp_path: Path) -> None:
    cfg = write_run(tmp_path / "r7")
    record = privacy_record(tmp_path / "r7", cfg)
    a, b = record["merchants"]["a"], record["merchants"]["b"]
    # a: epsilon after round 2's evaluation charge; steps 10 + 12; the latest sampling rate
    assert (a["epsilon"], a["delta"], a["steps"], a["sample_rate"], a["noise_multiplier"]) == (
        2.8,
        1e-6,
        22,
        0.04,
        1.2,
    )
    assert (a["accountant"], a["privacy_unit"], a["max_epsilon"]) == ("pld", "customer", 8.0)
    assert (a["rounds_trained"], a["status_last_round"]) == (2, "trained")
    assert [(r["round"], r["status"], r["epsilon"], r.get("steps")) for r in a["per_round"]] == [
        (0, "evaluated", 0.1, None),
        (1, "trained", 1.75, 10),
        (2, "trained", 2.8, 12),
    ]
    # b never reported its charge or settings: said so, not invented
    assert (b["epsilon"], b["delta"], b["steps"], b["rounds_trained"], b["status_last_round"]) == (
        2.0,
        1e-5,
        4,
        1,
        "refused-budget",
    )
    assert [
        b[k] for k in ("accountant", "privacy_unit", "noise_multiplier", "sample_rate", "max_epsilon")
    ] == [NR] * 5
    assert record["run"] == "r7" and record["rounds"] == {"planned": 3, "completed": 2}
    assert record["clipping_norm"] == 0.75 and record["task"] == {
        "name": "purchase-intent",
        "labels": ["no-buy", "buy"],
    }
    metrics = record["metrics"]
    assert (
        metrics["round"] == 2
        and metrics["values"]["accuracy"] == 0.7
        and metrics["values"]["examples"] == 500
    )
    assert metrics["bands"]["accuracy"] == ACCURACY and metrics["bands"]["auc"]["readable"] is False
    assert metrics["exact"] == {"round": 2, "accuracy": 0.71, "auc": 0.79}  # the last round's only
    assert "a 3, b 4" in metrics["release"] and "noise sd 5 per pooled count" in metrics["release"]
    assert record["sources"] == ["metrics.jsonl", "final/run-config.json", "exact-metrics.jsonl"]


def test_record_never_reads_the_card(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = write_run(run)
    before = privacy_record(run, cfg)
    table = "| merchant | epsilon | delta | privacy unit | accountant |\n|---|---|---|---|---|\n"
    (run / "final" / "README.md").write_text(
        table + "| a | 0.001 | 0.5 | household | laplace |\n| z | 1 | 1 | x | y |\n"
    )
    assert privacy_record(run, cfg) == before
    (run / "final" / "README.md").unlink()
    assert privacy_record(run, cfg) == before
    assert not hasattr(provenance, "card_merchant_table")


def test_card_is_a_rendering_of_the_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = write_run(run)
    record = privacy_record(run, cfg)
    card = render_card(record, CardOptions(kind=FINAL, loading=tuple(final_export.loading(cfg))))
    for name, m in record["merchants"].items():  # every merchant's epsilon, in its own row
        assert f"| {name} | {cell(m['epsilon'])} | {cell(m['delta'])} | {cell(m['accountant'])} |" in card
    assert "| a | 2.8 | 1e-06 | pld | customer | 1.2 | 0.04 | 22 | 2 | trained |" in card
    assert f"| b | 2 | 1e-05 | {NR} | {NR} | {NR} | {NR} | 4 | 1 | refused-budget |" in card
    for key, band in record["metrics"]["bands"].items():  # the headline metric with its noise band
        if band["readable"]:
            line = f"- {LABELS[key]} {band['value']:.3f} ± {band['sd']:.3f}"
            assert f"{line} (95% band {band['low']:.3f} to {band['high']:.3f})" in card
    assert "- accuracy 0.700 ± 0.020 (95% band 0.660 to 0.740)" in card
    assert "- AUC unreadable (noise sd 0.30 > 0.1)" in card and "- examples 500" in card
    assert "accuracy 0.710, AUC 0.790." in card and "Exact pooled metrics of round 2" in card
    assert "## Evaluation (round 2)" in card and "2 completed of 3 planned" in card
    assert all(f"- {item}" in card for item in record["not_covered"])
    # a different record gives a different card: the figures are read from the record, not fixed
    record["merchants"]["a"]["epsilon"] = 5.5
    other = render_card(record, CardOptions(kind=FINAL))
    assert "| a | 5.5 | 1e-06 |" in other and "| a | 2.8 |" not in other


def test_export_final_writes_the_record_then_the_card_from_it(tiny_bert: str, tmp_path: Path) -> None:
    from shared.adapters import extract_adapter
    from shared.model import build_model

    run = tmp_path / "run"
    cfg = RunConfig.parse({**CFG, "backbone": tiny_bert, "max-length": 32})
    rows = hand_rows()
    write_run(run, rows)
    model = build_model(tiny_bert, num_labels=2, lora=cfg.lora, pooling=cfg.pooling)
    final = final_export.export_final(model, extract_adapter(model), run / "final", cfg)
    record = json.loads((final / PRIVACY_FILE).read_text())
    assert record == json.loads(json.dumps(privacy_record(run, cfg))) and set(record["merchants"]) == {
        "a",
        "b",
    }
    card = (final / "README.md").read_text()
    assert card == render_card(record, CardOptions(kind=FINAL, loading=tuple(final_export.loading(cfg))))
    assert "| a | 2.8 | 1e-06 | pld | customer |" in card and f"`{tiny_bert}`" in card
    (final / "README.md").unlink()
    assert json.loads(json.dumps(privacy_record(run, cfg))) == record

    # the record is the run folder's rows, whatever they hold: here, a run stopped after round 1
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    final_export.export_final(model, extract_adapter(model), lone / "final", cfg)
    record = json.loads((lone / "final" / PRIVACY_FILE).read_text())
    assert record["rounds"]["completed"] == 1 and record["merchants"]["a"]["epsilon"] == 1.75
    assert record["merchants"]["b"]["steps"] == 4 and "exact" not in record["metrics"]


def test_each_folder_kind_renders_through_shared_model_card(tiny_bert: str, tmp_path: Path) -> None:
    from tests.trained_run import make_run

    for module in (final_export, hf_export, personalise, provenance):
        assert not hasattr(module, "model_card")
    assert not hasattr(provenance, "provenance_markdown")

    run = make_run(tmp_path / "run", tiny_bert)
    cfg = RunConfig.parse(json.loads((run / "final" / "run-config.json").read_text()))
    out = hf_export.export_run(run, tmp_path / "adapter", adapter_only=True)
    record = json.loads((out / PRIVACY_FILE).read_text())
    options = CardOptions(kind=EXPORT, loading=tuple(hf_export.loading(cfg, adapter_only=True)))
    card = (out / "README.md").read_text()
    assert card == render_card(record, options)
    assert card.startswith("# fedbehavior purchase-intent adapter (run run)\n")
    merged = render_card(
        record, CardOptions(kind=EXPORT, merged=True, loading=tuple(hf_export.loading(cfg, False)))
    )
    assert merged.startswith("# fedbehavior purchase-intent classifier (run run)\n")
    assert "trust_remote_code=True" in merged and "trust_remote_code" not in card


class _Model:
    """Just enough of a PEFT model for `save_model_folder`."""

    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "adapter_config.json").write_text("{}")


def test_personalised_card_renders_its_report_and_stays_with_the_merchant(tmp_path: Path) -> None:
    from client.evaluation.fine_tune import Scores

    scores = {
        personalise.GLOBAL: Scores(0.61, 0.66, 40),
        personalise.PERSONAL: Scores(0.7, 0.6, 40),
        personalise.LOCAL: Scores(0.55, 0.68, 40),
    }
    report = personalise.PersonaliseReport(
        merchant_id="shop-9",
        train="head",
        chosen=personalise.PERSONAL,
        model_in_folder=personalise.PERSONAL,
        best_epoch=2,
        customers={"fit": 120, "validation": 40, "held_out": 40},
        validation=scores,
        held_out={**scores, personalise.PERSONAL: Scores(0.72, 0.59, 40)},
        local_cross_validated=None,
        gain_over_local={},
        history=[],
        global_folder="state/global/run-1",
        out=str(tmp_path / "mine"),
    )
    out = tmp_path / "mine"
    personalise._write_out(out, _Model(), RunConfig(), report, None)  # type: ignore[arg-type]
    card = (out / "README.md").read_text()
    record = json.loads((out / personalise.REPORT_FILE).read_text())
    task = {"name": RunConfig().task_spec.name, "labels": list(RunConfig().task_spec.labels)}
    options = CardOptions(kind=PERSONALISED, record_file=personalise.REPORT_FILE)
    assert render_card(record | {"task": task}, options).splitlines()[:5] == card.splitlines()[:5]
    assert "**Not differentially private towards this merchant's customers**" in card
    assert "Keep it on the merchant's machines" in card and "send it to the coordinator" in card
    assert "Merchant shop-9's fine-tune (head) of the global model `state/global/run-1`" in card
    assert "| personalised | 0.7000 | 0.6000 | 0.7200 | 0.5900 |" in card
    assert "fit 120, validation 40, held_out 40" in card and "fedbehavior predict --model this_folder" in card
    assert not (out / PRIVACY_FILE).exists()  # no DP provenance is claimed for it


def test_card_options_are_checked() -> None:
    with pytest.raises(ValueError, match="only an export is merged"):
        CardOptions(kind=PERSONALISED, merged=True)
    with pytest.raises(ValueError, match="unknown model folder kind"):
        CardOptions(kind="checkpoint")  # type: ignore[arg-type]


def test_the_card_writer_imports_nothing_heavy() -> None:
    code = (
        "import sys, shared.model_card\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft', 'opacus', 'server', 'client', 'simulations'))\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_not_covered_is_what_the_replies_declare_public() -> None:
    """The card's 'not covered' list names every public reply value and nothing a reply no longer
    carries (an exact example count, a training loss)."""
    from server.provenance import not_covered
    from shared.protocol import REPLY_FIELDS

    items = not_covered()
    for field in (d for d in REPLY_FIELDS if d.kind == "public"):
        assert any(f"`{field.key}`" in item for item in items), field.key
    assert not any("loss" in item or "example count" in item for item in items)
    dp_keys = {d.key for d in REPLY_FIELDS if d.kind == "dp"} - {
        d.key for d in REPLY_FIELDS if d.kind == "public"
    }
    assert not any(f"`{key}`" in item for key in dp_keys for item in items)
