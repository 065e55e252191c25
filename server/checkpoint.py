"""Per-round checkpoints of the global adapter and of the coordinator's own state (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
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


def server_state_path(folder: Path, server_round: int) -> Path:
    return folder / f"server-{server_round:04d}.safetensors"


def save_server_state(
    folder: Path, server_round: int, tensors: dict[str, torch.Tensor], meta: dict[str, object]
) -> Path:
    """Write the coordinator's own state after `server_round` (server optimizer moments, norm history).

    One file per round, written before that round's adapter checkpoint and `latest.json`: whichever
    round `latest.json` names, its server state is already on disk, so a resume never pairs an adapter
    with the optimizer state of another round.
    """
    path = server_state_path(folder, server_round)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(cpu, metadata={"round": str(server_round), "meta": json.dumps(meta)}))
    return path


def load_server_state(
    folder: Path, server_round: int
) -> tuple[dict[str, torch.Tensor], dict[str, object]] | None:
    """(tensors, meta) saved after `server_round`, or None when that round has none."""
    path = server_state_path(folder, server_round)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    return tensors, meta
