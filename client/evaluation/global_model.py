"""The global model a merchant keeps: the latest global adapter it accepted, in a run's `final/` format.

Every participant receives the global adapter each round, so keeping it releases nothing. It lets the
merchant personalise (`client.evaluation.personalise`) or score (`fedbehavior predict`) without waiting
for the coordinator to publish the run's `final/`.
"""

from __future__ import annotations

import json
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from shared.config import MerchantPlan
from shared.fileio import atomic_write_bytes, atomic_write_json
from shared.trained import RUN_CONFIG_FILE

GLOBAL_DIR = "global"
LATEST_FILE = "latest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _folder_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return safe or "run"


def publish(staged: Path, target: Path) -> None:
    """Copy every file of `staged` into `target`, each atomically, the weights last: a reader of
    `target` never sees a partial file, and between two rounds of a run only the weights change."""
    files = sorted(
        (p for p in staged.iterdir() if p.is_file()), key=lambda p: (p.suffix in WEIGHT_SUFFIXES, p.name)
    )
    for path in files:
        atomic_write_bytes(target / path.name, path.read_bytes())


def save_model_folder(model: torch.nn.Module, folder: Path, cfg: MerchantPlan) -> None:
    """The model's PEFT adapter (`save_pretrained`) and its run config: a run's `final/` format."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        atomic_write_json(Path(tmp) / RUN_CONFIG_FILE, cfg.to_record())
        publish(Path(tmp), folder)


def save_global(
    state_dir: Path, model: torch.nn.Module, cfg: MerchantPlan, *, run_id: str, server_round: int
) -> Path:
    """Keep the global adapter loaded in `model` as `<state_dir>/global/<run>/` (the coordinator's run
    key: its run name) and point `<state_dir>/global/latest.json` at it. The adapter is what the
    coordinator sent every participant, so keeping it releases nothing."""
    root = Path(state_dir) / GLOBAL_DIR
    folder = root / _folder_name(run_id)
    save_model_folder(model, folder, cfg)
    pointer = {"run": folder.name, "run_id": run_id, "round": server_round, "saved_at": now()}
    atomic_write_json(root / LATEST_FILE, pointer)
    return folder


def latest_global(state_dir: Path) -> Path:
    """The global model folder the merchant saved last."""
    pointer = Path(state_dir) / GLOBAL_DIR / LATEST_FILE
    if not pointer.exists():
        raise FileNotFoundError(
            f"no global model saved in {pointer.parent}: take part in a run first (each evaluation keeps "
            "the global adapter) or pass --global <a run's final/ or an export>"
        )
    return pointer.parent / json.loads(pointer.read_text(encoding="utf-8"))["run"]


def now() -> str:
    """The current UTC time, to the second, as ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
