"""Per-round checkpoints of the global adapter (safetensors) and the final PEFT export."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.adapters import AdapterState
from shared.fileio import atomic_write_bytes, atomic_write_json

LATEST = "latest.json"


def save_checkpoint(folder: Path, server_round: int, adapter: AdapterState, meta: dict[str, object]) -> Path:
    """Write `round-NNNN.safetensors` and point `latest.json` at it (both atomically)."""
    path = folder / f"round-{server_round:04d}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
    atomic_write_bytes(path, st_save(tensors, metadata={"round": str(server_round)}))
    atomic_write_json(folder / LATEST, {"round": server_round, "file": path.name, **meta})
    return path


def load_latest(folder: Path) -> tuple[int, AdapterState] | None:
    """(round, adapter) of the newest checkpoint in `folder`, or None if there is none."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text(encoding="utf-8"))
    tensors: dict[str, torch.Tensor] = st_load((folder / info["file"]).read_bytes())
    return int(info["round"]), tensors
