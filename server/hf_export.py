"""`fedbehavior export runs/<name> --out <folder>`: a model folder for plain transformers, with its
DP provenance.

The merged export: the LoRA matrices merged into the backbone (`merge_and_unload`), the trained head,
the tokenizer, `config.json` with `id2label`/`label2id`, and, for the default mean pooling, the
modelling code (`modeling_fedbehavior.py`, named in `auto_map`): it loads with
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` where neither
fedbehavior nor peft is installed. `--adapter-only` copies the run's PEFT folder instead. Both carry
`privacy.json`, the provenance record built from the run folder's data (`server.provenance`), and
`README.md`, the model card rendered from that record (`shared.model_card`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import server.modeling_fedbehavior as modeling
from server.provenance import privacy_record, write_provenance
from shared.config import RunConfig
from shared.model import MEAN_POOLINGS
from shared.model_card import EXPORT, CardOptions
from shared.trained import ADAPTER_CONFIG, EXPORT_KEY, load_trained, quietly, read_run_config

MODELING_FILE = "modeling_fedbehavior.py"
EXPORT_CONFIG_KEYS = (
    "task",
    "category-labels",
    "customer-labels",
    "leak-roles",
    "repeat-days",
    "max-length",
    "pooling",
)
"""Run-config keys an export keeps (the task and how its text is built); no coordinator paths."""


def _final_of(run_dir: Path) -> Path:
    final = run_dir / "final"
    if not (final / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(
            f"{final} holds no adapter ({ADAPTER_CONFIG}): pass a finished run's folder (runs/<name>)"
        )
    return final


def _empty_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; remove it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)


def export_run(run_dir: Path, out: Path, *, adapter_only: bool = False) -> Path:
    """Write the export of the run in `run_dir` to `out` (which must be new or empty); return `out`."""
    run_dir, out = Path(run_dir), Path(out)
    final = _final_of(run_dir)
    cfg = read_run_config(final)
    record = privacy_record(run_dir, cfg)
    _empty_out(out)
    if adapter_only:
        shutil.copytree(final, out, dirs_exist_ok=True)
    else:
        merge_to(final, out, cfg)
    options = CardOptions(kind=EXPORT, merged=not adapter_only, loading=tuple(loading(cfg, adapter_only)))
    write_provenance(out, record, options)
    return out


def merge_to(final: Path, out: Path, cfg: RunConfig) -> None:
    """Merge `final`'s adapter into its backbone and save a plain-transformers folder to `out`."""
    trained = load_trained(final)
    merged: Any = trained.model.merge_and_unload()  # type: ignore[operator]
    labels = trained.task.labels
    merged.config.id2label = dict(enumerate(labels))
    merged.config.label2id = {name: i for i, name in enumerate(labels)}
    quietly(merged.save_pretrained, str(out))
    trained.tokenizer.save_pretrained(str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config[EXPORT_KEY] = {k: v for k, v in cfg.to_record().items() if k in EXPORT_CONFIG_KEYS}
    if cfg.pooling in MEAN_POOLINGS:  # no stock class pools this way: ship the code (modeling_fedbehavior)
        config["normalize_pooled"] = cfg.pooling == "mean-l2"
        shutil.copyfile(modeling.__file__, out / MODELING_FILE)
        module = MODELING_FILE.removesuffix(".py")
        config["model_type"] = modeling.FedBehaviorBertConfig.model_type
        config["architectures"] = [modeling.FedBehaviorBertForSequenceClassification.__name__]
        config["auto_map"] = {
            "AutoConfig": f"{module}.{modeling.FedBehaviorBertConfig.__name__}",
            "AutoModelForSequenceClassification": (
                f"{module}.{modeling.FedBehaviorBertForSequenceClassification.__name__}"
            ),
        }
    else:
        config["architectures"] = ["BertForSequenceClassification"]
    # a plain write: the folder is new, and a model folder is meant to be readable by others (0644)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def loading(cfg: RunConfig, adapter_only: bool) -> list[str]:
    """How to load an export, and what its inputs are: the card's `loading` lines."""
    inputs = (
        f"Inputs are behaviour events as text (fedbehavior's serializer, at most {cfg.max_length} tokens); "
        "`fedbehavior predict` builds them from any export the ingest reads."
    )
    if adapter_only:
        return [
            "A LoRA adapter and classifier head in PEFT format. Load it with fedbehavior "
            "(`fedbehavior predict --model this_folder ...`) or `PeftModel.from_pretrained` over the "
            "backbone named in `adapter_config.json`, with the pooling of `run-config.json`.",
            "",
            inputs,
        ]
    code = (
        "The head reads the attention-masked mean of the last hidden states, which no stock transformers "
        f"class does: the modelling code ships in this folder (`{MODELING_FILE}`, named in `auto_map` of "
        "`config.json`), so loading needs `trust_remote_code=True`. Read that file before trusting it. "
        "Its config has its own model type, so a load without the flag fails instead of quietly using "
        "[CLS] pooling; the tokenizer is a stock BERT tokenizer (the flag only spares its config prompt)."
        if cfg.pooling in MEAN_POOLINGS
        else "The head reads the pooled [CLS] vector: a stock `BertForSequenceClassification`."
    )
    flag = ", trust_remote_code=True" if cfg.pooling in MEAN_POOLINGS else ""
    merged = (
        "The backbone with the trained classifier head (a head-only run: its LoRA matrices stayed zero, so "
        "the merge leaves the backbone as it was)"
        if cfg.lora.trainable == "head"
        else "LoRA merged into the backbone, classifier head included"
    )
    return [
        f"{merged}; needs only torch and transformers.",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        f"model = AutoModelForSequenceClassification.from_pretrained(folder{flag})",
        f"tokenizer = AutoTokenizer.from_pretrained(folder{flag})",
        "```",
        "",
        code,
        "",
        inputs,
    ]


def cmd_export(args: argparse.Namespace) -> int:
    """`fedbehavior export`: run the export and say where it went."""
    out = export_run(Path(args.run_dir), Path(args.out), adapter_only=args.adapter_only)
    print(f"export ({'PEFT adapter' if args.adapter_only else 'merged'}): {out}")
    return 0
