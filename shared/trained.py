"""A trained model folder, loaded for inference: a run's `final/` (PEFT adapter) or a merged export.

Both kinds say what they are: `final/` holds `adapter_config.json` and the run config
(`run-config.json`, written by `server.export`), a merged export holds a `config.json` whose
`fedbehavior` entry names the task, its labels and the text settings (written by `server.hf_export`).
A `final/` of an older run without `run-config.json` falls back to the defaults plus the adapter's
base model; `overrides` (run-config keys, as `--set` gives them) correct what the folder lacks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from shared.config import RunConfig
from shared.model import POOLING, resolve_backbone
from shared.tasks import TaskSpec

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run-config.json"  # the name server.export writes (kept equal by a test)
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_KEY = "fedbehavior"
"""The entry of an export's config.json that holds the run config."""


@dataclass
class Trained:
    """A model ready for inference, its tokenizer and the run config it was trained with."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    cfg: RunConfig
    kind: str  # "adapter" (a run's final/) or "export" (merged)

    @property
    def task(self) -> TaskSpec:
        return self.cfg.task_spec


def read_run_config(folder: Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The run config stored in `folder` (final/ or export), with `overrides` applied on top."""
    values: dict[str, Any] = {}
    if (folder / RUN_CONFIG_FILE).exists():
        values = json.loads((folder / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    elif (folder / "config.json").exists() and not (folder / ADAPTER_CONFIG).exists():
        values = dict(json.loads((folder / "config.json").read_text(encoding="utf-8")).get(EXPORT_KEY, {}))
    elif (folder / ADAPTER_CONFIG).exists():
        adapter = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        values = {"backbone": adapter.get("base_model_name_or_path") or ""}
        log.warning(
            "%s has no %s (a run older than this export format): assuming the default task and "
            "pooling; pass --task / --set to correct them",
            folder,
            RUN_CONFIG_FILE,
        )
    return RunConfig.parse({**values, **dict(overrides or {})})


def quietly(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a from_pretrained / save_pretrained without its expected chatter (a head missing from the
    base) and progress bars, which are noise in a command that loads one small model."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        return call(*args, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def load_final(folder: Path, cfg: RunConfig) -> torch.nn.Module:
    """Backbone (with the run's pooling) + the PEFT adapter of `folder`, in eval mode, unmerged."""
    from peft import PeftModel

    base = quietly(
        POOLING[cfg.pooling].from_pretrained,
        resolve_backbone(cfg.backbone),
        num_labels=cfg.task_spec.num_labels,
        ignore_mismatched_sizes=True,
    )
    model = PeftModel.from_pretrained(base, str(folder))
    model.eval()
    return model


def load_trained(
    folder: Path, *, overrides: Mapping[str, Any] | None = None, device: torch.device | str = "cpu"
) -> Trained:
    """Load a run's `final/` (or the run folder holding it) or a merged export, for inference.

    An export is loaded with fedbehavior's own class, never with the code shipped in the folder:
    predicting with a model received from someone else then executes none of its files."""
    folder = Path(folder)
    if (folder / "final" / ADAPTER_CONFIG).exists():
        folder = folder / "final"
    cfg = read_run_config(folder, overrides)
    if (folder / ADAPTER_CONFIG).exists():
        model, kind = load_final(folder, cfg), "adapter"
        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(cfg.backbone))
    elif (folder / "config.json").exists():
        model = quietly(POOLING[cfg.pooling].from_pretrained, str(folder))
        model.eval()
        kind = "export"
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    else:
        raise FileNotFoundError(
            f"{folder} is neither a run's final/ folder (no {ADAPTER_CONFIG}) nor an export "
            "(no config.json); pass --model runs/<name>/final or a folder written by fedbehavior export"
        )
    if model.config.num_labels != cfg.task_spec.num_labels:  # type: ignore[union-attr]
        raise ValueError(
            f"the model in {folder} has {model.config.num_labels} labels but task "  # type: ignore[union-attr]
            f"{cfg.task} has {cfg.task_spec.num_labels}; pass the run's --task / --set values"
        )
    model.to(torch.device(device))
    return Trained(model, tokenizer, cfg, kind)
