"""`fedbehavior export`: the merged folder predicts what base + adapter predicts, loads with plain
transformers where fedbehavior and peft are absent, and carries the DP provenance of the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from server import export as final_export
from server.hf_export import export_run
from server.provenance import NOT_REPORTED
from shared import trained as trained_module
from shared.config import RunConfig
from shared.trained import load_final, load_trained
from tests.trained_run import make_run

TEXTS = ["view iphone 12 手机 phones 5999 ; fav iphone 12", "search shoes", "view 书 books 20 ; cart 书"]


@pytest.fixture(scope="module")
def run_and_export(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    run = make_run(root / "run", tiny_bert)
    return run, export_run(run, root / "merged")


def _logits(model: torch.nn.Module, tokenizer: object) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        return model(**batch).logits  # type: ignore[no-any-return]


def test_merged_export_equals_base_plus_adapter(run_and_export: tuple[Path, Path], tiny_bert: str) -> None:
    run, merged = run_and_export
    cfg = RunConfig.parse(json.loads((run / "final" / "run-config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    expected = _logits(load_final(run / "final", cfg), tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(str(merged), trust_remote_code=True)
    model.eval()
    got = _logits(model, AutoTokenizer.from_pretrained(str(merged)))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert type(model).__name__ == "FedBehaviorBertForSequenceClassification"
    assert model.config.id2label == {0: "no-buy", 1: "buy"}
    assert model.config.label2id == {"no-buy": 0, "buy": 1}


def test_adapter_changes_the_predictions(run_and_export: tuple[Path, Path], tiny_bert: str) -> None:
    run, _ = run_and_export
    peft_model = load_trained(run / "final").model
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    with_adapter = _logits(peft_model, tokenizer)
    with peft_model.disable_adapter():  # type: ignore[operator]
        without = _logits(peft_model, tokenizer)
    assert (with_adapter - without).abs().max() > 1e-3  # else equality above would prove nothing


STANDALONE = """
import sys
try:
    import shared
except ImportError:
    pass
else:
    raise SystemExit("fedbehavior's shared package is importable: " + str(shared.__file__))
sys.path.append({site!r})
from transformers import AutoModelForSequenceClassification, AutoTokenizer
import torch
model = AutoModelForSequenceClassification.from_pretrained({folder!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({folder!r}, trust_remote_code=True)
with torch.no_grad():
    logits = model(**tokenizer({texts!r}, padding=True, return_tensors="pt")).logits
assert "peft" not in sys.modules, "loading imported peft"
assert not any(m == "shared" or m.startswith(("shared.", "server.", "client.")) for m in sys.modules)
print("LOGITS", repr(logits.tolist()))
"""


def test_export_loads_without_fedbehavior_or_peft(run_and_export: tuple[Path, Path], tmp_path: Path) -> None:
    _, merged = run_and_export
    code = STANDALONE.format(site=sysconfig.get_paths()["purelib"], folder=str(merged), texts=TEXTS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf")  # the remote-code module cache goes here, not into ~/.cache
    # -S: no site processing, so the editable install's finder (fedbehavior on sys.path) is not loaded
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOGITS "))
    logits = torch.tensor(json.loads(line.removeprefix("LOGITS ")))
    model = AutoModelForSequenceClassification.from_pretrained(str(merged), trust_remote_code=True).eval()
    assert torch.allclose(logits, _logits(model, AutoTokenizer.from_pretrained(str(merged))), atol=1e-5)


def test_export_without_trust_remote_code_fails_loudly(run_and_export: tuple[Path, Path]) -> None:
    """No silent fallback to a stock class with [CLS] pooling: the model type is our own."""
    _, merged = run_and_export
    with pytest.raises(ValueError):
        AutoModelForSequenceClassification.from_pretrained(str(merged), trust_remote_code=False)


def test_privacy_json_and_card_hold_the_run_figures(run_and_export: tuple[Path, Path]) -> None:
    _, merged = run_and_export
    record = json.loads((merged / "privacy.json").read_text())
    m1, m2 = record["merchants"]["m1"], record["merchants"]["m2"]
    assert (m1["epsilon"], m1["delta"], m1["steps"], m1["noise_multiplier"]) == (4.0, 1e-6, 15, 1.1)
    assert (m1["rounds_trained"], m2["rounds_trained"], m2["status_last_round"]) == (2, 1, "refused-budget")
    assert m2["epsilon"] == 3.0 and m2["steps"] == NOT_REPORTED and m2["noise_multiplier"] == NOT_REPORTED
    assert m1["sample_rate"] == NOT_REPORTED and m1["accountant"] == NOT_REPORTED
    assert record["clipping_norm"] == 1.5 and record["rounds"] == {"planned": 2, "completed": 2}
    assert record["task"] == {"name": "purchase-intent", "labels": ["no-buy", "buy"]}
    assert record["metrics"]["values"]["accuracy"] == 0.7 and record["metrics"]["round"] == 2
    assert record["not_covered"]
    card = (merged / "README.md").read_text()
    assert "trust_remote_code=True" in card and "modeling_fedbehavior.py" in card
    assert "| m1 | 4 | 1e-06 | not reported by the merchant |" in card
    assert "Evaluation set: federated evaluation" in card


def test_units_come_from_metrics_jsonl_never_from_the_card(tiny_bert: str, tmp_path: Path) -> None:
    """privacy.json is built from data: the merchants' reported accountant and privacy unit reach it
    from metrics.jsonl, and whatever final/README.md says (or whether it exists) changes nothing."""
    run = make_run(tmp_path / "run", tiny_bert)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[1]["merchants"]["m1"] |= {"accountant": "rdp", "privacy_unit": "session"}
    rows[2]["merchants"]["m1"] |= {"accountant": "rdp", "privacy_unit": "customer"}  # the latest wins
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = run / "final" / "README.md"
    card.write_text(card.read_text().replace("| m2 |", "| m2 | forged | pld | household |"))
    out = export_run(run, tmp_path / "adapter", adapter_only=True)
    record = json.loads((out / "privacy.json").read_text())
    m1, m2 = record["merchants"]["m1"], record["merchants"]["m2"]
    assert (m1["privacy_unit"], m1["accountant"]) == ("customer", "rdp")
    assert (m2["privacy_unit"], m2["accountant"]) == (NOT_REPORTED, NOT_REPORTED)  # m2 never reported them
    assert "final/README.md" not in record["sources"] and "forged" not in json.dumps(record)
    card.unlink()
    again = export_run(run, tmp_path / "again", adapter_only=True)
    assert json.loads((again / "privacy.json").read_text()) == record
    exported_card = (out / "README.md").read_text()
    assert "| m1 | 4 | 1e-06 | rdp | customer | 1.1 | not reported by the merchant | 15 | 2 | trained |" in (
        exported_card
    )
    assert "forged" not in exported_card and "PeftModel.from_pretrained" in exported_card
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
    with pytest.raises(FileExistsError):
        export_run(run, out)


def test_run_config_file_name_is_shared() -> None:
    assert final_export.RUN_CONFIG_FILE == trained_module.RUN_CONFIG_FILE
