"""Personalisation: the kept global adapter, local fine-tuning, the fallback rule, predict on the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client import merchant
from client.cli import add_personalise_cli
from client.evaluation.baseline import LogisticRegression, behaviour_counts, cross_validated_probabilities
from client.evaluation.fine_tune import PersonaliseSettings, Scores, fine_tune, start_model
from client.evaluation.global_model import GLOBAL_DIR, LATEST_FILE, latest_global
from client.evaluation.personalise import (
    GLOBAL,
    LOCAL,
    LOCAL_ONLY_FILE,
    PERSONAL,
    REPORT_FILE,
    STATE_LOG,
    Split,
    choose,
    personalise,
)
from client.evaluation.predict import predict as predict_file
from client.settings import MerchantSettings
from client.training.loop import predict
from shared.adapters import extract_adapter
from shared.config import RunConfig
from shared.tasks import one_per_customer
from shared.trained import load_trained
from simulations.synthetic import generate_merchant
from tests.tiny import small_config

CPU = torch.device("cpu")


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    generate_merchant(3, 0, tmp_path / "m0", base_customers=80)
    return tmp_path / "m0"


def a_global_adapter(cfg: RunConfig, settings: MerchantSettings) -> dict[str, torch.Tensor]:
    """The model's adapter with every tensor moved off its initialisation, as after a few rounds."""
    model, *_ = merchant._prepare(settings, cfg)
    generator = torch.Generator().manual_seed(3)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in extract_adapter(model).items()
    }


def kept_global(tiny_bert: str, shop: Path, **extra: object) -> tuple[MerchantSettings, RunConfig, dict]:
    settings = MerchantSettings.from_merchant_dir(shop)
    cfg = small_config(tiny_bert, **extra)
    g = a_global_adapter(cfg, settings)
    out = merchant.evaluate_round(settings, cfg, g, server_round=2, run_id="run 7/x", seed=1)
    assert out.status == "evaluated"
    return settings, cfg, g


def test_evaluation_keeps_the_global_adapter_it_accepted(tiny_bert: str, shop: Path) -> None:
    settings, cfg, g = kept_global(tiny_bert, shop)
    folder = latest_global(settings.state_dir)
    assert folder == settings.state_dir / GLOBAL_DIR / "run-7-x"  # the run id, made a safe folder name
    pointer = json.loads((settings.state_dir / GLOBAL_DIR / LATEST_FILE).read_text())
    assert (pointer["run_id"], pointer["round"]) == ("run 7/x", 2)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    # the kept folder is a final/: predict's loader reads it, and it computes what the adapter does
    trained = load_trained(folder)
    assert trained.cfg.task == cfg.task and trained.cfg.backbone == tiny_bert
    model, encoder, data, _ = merchant._prepare(settings, cfg)
    merchant.load_adapter(model, g)
    x = encoder.encode(data.evaluation()[:12])
    expected, _ = predict(model, x, batch_size=64, device=CPU)
    got, _ = predict(trained.model, x, batch_size=64, device=CPU)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # a malformed adapter is not kept
    bad = {**g, next(iter(g)): torch.zeros(3, 3)}
    merchant.evaluate_round(settings, cfg, bad, server_round=3, run_id="other", seed=1)
    assert latest_global(settings.state_dir) == folder


def test_head_fine_tuning_improves_the_training_fit(tiny_bert: str, shop: Path) -> None:
    settings, *_ = kept_global(tiny_bert, shop)
    model, cfg, backbone = start_model(latest_global(settings.state_dir), "head", CPU)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("classifier" in n and "lora_" not in n for n in trainable)
    data = merchant._prepare(settings, cfg)[2]
    split = Split.of(data, PersonaliseSettings(), settings.merchant_id)
    encoder = merchant.cached_encoder(backbone, cfg.max_length)
    fit = encoder.encode(split.fit)
    labels = fit.labels.numpy()
    before = Scores.of(labels, predict(model, fit, batch_size=64, device=CPU)[0])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # validating on the fit set itself: the epoch kept is the best training fit
    fitted = fine_tune(model, fit, fit, PersonaliseSettings(epochs=15, learning_rate=0.05), CPU)
    after = Scores.of(labels, predict(model, fit, batch_size=64, device=CPU)[0])
    assert fitted.best_epoch > 0 and after.loss < before.loss - 0.01
    assert after.auc is not None and before.auc is not None and after.auc > before.auc
    # the cached-input shortcut scored what the whole model scores
    best = fitted.history[fitted.best_epoch]
    assert best["loss"] == pytest.approx(after.loss, abs=1e-5)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_lora_mode_trains_lora_and_head(tiny_bert: str, shop: Path) -> None:
    settings, *_ = kept_global(tiny_bert, shop)
    model, *_ = start_model(latest_global(settings.state_dir), "lora+head", CPU)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)


def test_personalise_end_to_end_and_predict_on_the_result(tiny_bert: str, shop: Path, tmp_path: Path) -> None:
    settings, cfg, _ = kept_global(tiny_bert, shop)
    out = tmp_path / "personal"
    report = personalise(shop, out=out, settings=PersonaliseSettings(epochs=6, learning_rate=0.05))
    # never trained (nor validated) on held-out customers: the split federated training uses
    data = merchant._prepare(settings, cfg)[2]
    assert report.held_out_ids == set(data.eval_customers)
    assert not report.fit_ids & report.held_out_ids and not report.validation_ids & report.held_out_ids
    assert not report.fit_ids & report.validation_ids
    assert report.fit_ids | report.validation_ids <= set(data.train_customers)
    assert report.chosen in (LOCAL, GLOBAL, PERSONAL) and report.chosen == choose(report.validation)
    # the gain over local-only is the held-out AUC difference (its interval: tests/test_metrics.py)
    for name, model_name in (("global", GLOBAL), ("kept", report.chosen)):
        gain = report.gain_over_local[name]
        auc, local_auc = report.held_out[model_name].auc, report.held_out[LOCAL].auc
        assert gain is not None and auc is not None and local_auc is not None
        assert gain.estimate == pytest.approx(auc - local_auc, abs=1e-9) and gain.low <= gain.high
    assert any("paired bootstrap" in line for line in report.lines())
    # the folder holds the model the report scored
    trained = load_trained(out)
    held = data.evaluation()
    encoded = merchant.cached_encoder(tiny_bert, cfg.max_length).encode(held)
    probs, _ = predict(trained.model, encoded, batch_size=64, device=CPU)
    labels = np.asarray([c.label for c in held])
    assert Scores.of(labels, probs).loss == pytest.approx(
        report.held_out[report.model_in_folder].loss, abs=1e-5
    )
    written = json.loads((out / REPORT_FILE).read_text())
    assert written["chosen"] == report.chosen and "fit_ids" not in written
    assert json.loads((settings.state_dir / STATE_LOG).read_text().splitlines()[-1])["out"] == str(out)
    # predict reads the folder unchanged: one row per session of the merchant's events
    scores = tmp_path / "scores.jsonl"
    result = predict_file(out, shop, scores)
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert result.rows == len(rows) > 0
    assert all(abs(r["p_no-buy"] + r["p_buy"] - 1) < 1e-5 for r in rows)
    # running again replaces the earlier personalisation; anything else is refused
    personalise(shop, out=out, settings=PersonaliseSettings(epochs=1))
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds something else"):
        personalise(shop, out=other, settings=PersonaliseSettings(epochs=1))


def test_fallback_to_local_only_keeps_its_model(
    tiny_bert: str, shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.evaluation import personalise as module

    settings, cfg, _ = kept_global(tiny_bert, shop)
    monkeypatch.setattr(module, "choose", lambda validation: LOCAL)
    report = personalise(shop, out=tmp_path / "p", settings=PersonaliseSettings(epochs=1))
    assert report.chosen == LOCAL
    weights = np.asarray(json.loads((tmp_path / "p" / LOCAL_ONLY_FILE).read_text())["weights"])
    data = merchant._prepare(settings, cfg)[2]
    held = data.evaluation()
    labels = np.asarray([c.label for c in held])
    probs = LogisticRegression(weights).predict_proba(behaviour_counts(held))
    assert Scores.of(labels, probs).loss == pytest.approx(report.held_out[LOCAL].loss)
    assert any("local-only" in line for line in report.lines())
    # the regression out of fold on every training customer (one session each, as it trains)
    train = one_per_customer(data.train_candidates, data.train_customers, round_seed="baseline")
    oof = cross_validated_probabilities(train, 2, folds=5, salt=settings.merchant_id)
    cv = report.local_cross_validated
    assert cv is not None and cv.examples == len(data.train_customers)
    assert cv.loss == pytest.approx(Scores.of(np.asarray([c.label for c in train]), oof).loss)
    assert any("5-fold" in line for line in report.lines())


def s(auc: float | None, loss: float) -> Scores:
    return Scores(auc, loss, 50)


@pytest.mark.parametrize(
    ("personal", "global_", "local", "kept"),
    [
        (s(0.80, 0.5), s(0.70, 0.5), s(0.75, 0.5), PERSONAL),  # beats both
        (s(0.72, 0.5), s(0.70, 0.5), s(0.75, 0.5), LOCAL),  # beats global only: the better of the two
        (s(0.72, 0.5), s(0.75, 0.5), s(0.70, 0.5), GLOBAL),  # beats local only
        (s(0.75, 0.5), s(0.75, 0.5), s(0.70, 0.5), GLOBAL),  # a tie on AUC: the lower loss wins
        (s(0.75, 0.4), s(0.75, 0.5), s(0.70, 0.5), PERSONAL),
        (s(0.60, 0.5), s(0.65, 0.5), s(0.65, 0.5), GLOBAL),  # global and local tie: global
        (s(None, 0.9), s(None, 1.0), s(None, 1.1), PERSONAL),  # multi-class: loss alone
        (s(None, 1.2), s(None, 1.0), s(None, 0.9), LOCAL),
    ],
)
def test_fallback_rule(personal: Scores, global_: Scores, local: Scores, kept: str) -> None:
    assert choose({PERSONAL: personal, GLOBAL: global_, LOCAL: local}) == kept


def test_scores_against_hand_computed_values() -> None:
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    got = Scores.of(labels, probs)
    assert got.auc == pytest.approx(0.75)  # (positive, negative) pairs: .8>.1, .8>.7, .4>.1, .4<.7
    assert got.loss == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.3])))


def test_cli_parses_the_documented_command() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_personalise_cli(sub)
    args = parser.parse_args(["personalise", "m0", "--global", "g", "--train", "lora+head", "--out", "o"])
    assert (args.merchant_dir, args.global_folder, args.train, args.out) == ("m0", "g", "lora+head", "o")
    assert args.epochs == PersonaliseSettings().epochs
    with pytest.raises(ValueError, match="--train"):
        PersonaliseSettings(train="lora")


def test_an_export_as_the_global_model(tiny_bert: str, shop: Path, tmp_path: Path) -> None:
    from server.hf_export import merge_to

    settings, cfg, _ = kept_global(tiny_bert, shop)
    export = tmp_path / "export"
    export.mkdir()
    merge_to(latest_global(settings.state_dir), export, cfg)
    model, started_cfg, backbone = start_model(export, "head", CPU)
    assert backbone == str(export.resolve()) and started_cfg.backbone == backbone
    held = merchant._prepare(settings, cfg)[2].evaluation()
    encoded = merchant.cached_encoder(tiny_bert, cfg.max_length).encode(held)
    # a fresh adapter over the export (B = 0) computes what the export computes
    expected, _ = predict(load_trained(export).model, encoded, batch_size=64, device=CPU)
    np.testing.assert_allclose(predict(model, encoded, batch_size=64, device=CPU)[0], expected, atol=1e-5)
    report = personalise(
        shop, out=tmp_path / "p", global_folder=export, settings=PersonaliseSettings(epochs=2)
    )
    assert load_trained(tmp_path / "p").kind == "adapter" and report.global_folder == str(export)


def test_the_experiment_prints_one_row_per_merchant(
    tiny_bert: str, shop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations.experiments import personalisation

    settings, *_ = kept_global(tiny_bert, shop)
    out = tmp_path / "study"
    argv = ["--global", str(latest_global(settings.state_dir)), "--merchants", str(shop), "--epochs", "2"]
    assert personalisation.main([*argv, "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["merchant"] == settings.merchant_id and row["kept_auc"] == row[f"{row['chosen']}_auc"]
    assert row["kept_gain_estimate"] == pytest.approx(row["kept_auc"] - row["local-only_auc"], abs=1e-9)
    printed = capsys.readouterr().out
    assert "median" in printed and settings.merchant_id in printed
    assert personalisation.medians([row])["global_loss"] == row["global_loss"]


def test_a_run_leaves_each_merchant_the_final_global_adapter(tiny_bert: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from simulations.inprocess import run_in_process

    dirs = [tmp_path / f"merchant-{i}" for i in range(2)]
    for i, folder in enumerate(dirs):
        generate_merchant(2, i, folder, base_customers=40)
    cfg = small_config(tiny_bert, **{"num-rounds": 1, "sim-customers": 40})
    run = run_in_process(cfg, dirs, tmp_path / "runs" / "r1")
    final = load_file(str(run / "final" / "adapter_model.safetensors"))
    for folder in dirs:
        kept = load_file(str(latest_global(folder / "state") / "adapter_model.safetensors"))
        assert kept.keys() == final.keys()
        assert all(torch.equal(kept[k], final[k]) for k in final)
