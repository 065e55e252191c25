"""The final artefact: the global adapter in PEFT format, its DP provenance record (`privacy.json`) and
the model card rendered from that record (`shared.model_card`)."""

from __future__ import annotations

from pathlib import Path

import torch

from server.provenance import privacy_record, write_provenance
from shared.adapters import AdapterState, load_adapter
from shared.config import RunConfig
from shared.fileio import atomic_write_json
from shared.model import MEAN_POOLINGS, POOLING, resolve_backbone
from shared.model_card import FINAL, CardOptions

RUN_CONFIG_FILE = "run-config.json"
"""The run config (kebab-case keys) beside the adapter in `final/`."""


def export_final(
    model: torch.nn.Module,
    adapter: AdapterState,
    folder: Path,
    cfg: RunConfig,
) -> Path:
    """Save `adapter` with `save_pretrained` (loadable by `PeftModel.from_pretrained`), the run config,
    the provenance record `privacy.json`, and `README.md` rendered from that record.

    The record is built from data only, as `server.provenance.privacy_record` builds it: the run
    folder's (`folder.parent`) `metrics.jsonl` and `exact-metrics.jsonl`, and `cfg`."""
    load_adapter(model, adapter)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))  # type: ignore[operator]
    # machine-readable: predict and the merged export read task, labels, backbone, pooling from it
    atomic_write_json(folder / RUN_CONFIG_FILE, cfg.to_record())
    record = privacy_record(folder.parent, cfg)
    write_provenance(folder, record, CardOptions(kind=FINAL, loading=tuple(loading(cfg))))
    return folder


_POOLED = {
    "mean-l2": "attention-masked mean of the last hidden states, scaled to unit length",
    "mean": "attention-masked mean of the last hidden states",
    "cls": "pooled [CLS] vector",
}


def _base_class(cfg: RunConfig) -> str:
    return (
        f"shared.model.{POOLING[cfg.pooling].__name__}"
        if cfg.pooling in MEAN_POOLINGS
        else "BertForSequenceClassification"
    )


def loading(cfg: RunConfig) -> list[str]:
    """How to load a run's `final/`: the card's `loading` lines."""
    return [
        f"Backbone: `{resolve_backbone(cfg.backbone)}`. Load it with fedbehavior "
        "(`fedbehavior predict --model this_folder ...`) or with "
        f"`PeftModel.from_pretrained({_base_class(cfg)}.from_pretrained(backbone, "
        f"num_labels={cfg.task_spec.num_labels}), this_folder)`. The head reads the {_POOLED[cfg.pooling]} "
        "(`pooling` in `run-config.json`, which holds every training setting of the run).",
    ]
