"""Adapter FedAvg with update validation, as plain functions over tensors (no Flower).

A merchant's update is accepted only if it has exactly the global adapter's keys and shapes, finite
values, and an update norm within a bound; otherwise it is rejected and reported, never averaged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.adapters import AdapterSpec, AdapterState, OutgoingGuardError


@dataclass(frozen=True)
class Update:
    """One merchant's trained adapter and the number of examples it was trained on."""

    merchant: str
    adapter: AdapterState
    examples: int


def validate_update(
    update: Update, global_adapter: Mapping[str, torch.Tensor], *, max_update_norm: float = math.inf
) -> str | None:
    """The reason to reject `update`, or None when it may be averaged."""
    try:
        AdapterSpec({k: tuple(v.shape) for k, v in global_adapter.items()}).check(
            update.adapter, what="update"
        )
    except OutgoingGuardError as err:
        return str(err)
    if update.examples < 1:
        return f"update claims {update.examples} examples"
    squared = 0.0
    for key, tensor in update.adapter.items():
        if not bool(torch.isfinite(tensor).all()):
            return f"non-finite values in {key}"
        squared += float(((tensor.float() - global_adapter[key].float()) ** 2).sum())
    if math.sqrt(squared) > max_update_norm:
        return f"update norm {math.sqrt(squared):.3g} exceeds the bound {max_update_norm:.3g}"
    return None


def fedavg(updates: Sequence[Update]) -> AdapterState:
    """Example-weighted average of adapters: Σ nᵢ·wᵢ / Σ nᵢ, computed in float64."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = sum(u.examples for u in updates)
    if total <= 0:
        raise ValueError("fedavg needs a positive total number of examples")
    keys = updates[0].adapter.keys()
    averaged: AdapterState = {}
    for key in keys:
        acc = torch.zeros_like(updates[0].adapter[key], dtype=torch.float64)
        for u in updates:
            acc += u.adapter[key].to(torch.float64) * (u.examples / total)
        averaged[key] = acc.to(torch.float32)
    return averaged


def weighted_metrics(reports: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Average each metric over the reports that have it, weighted by their `examples`."""
    out: dict[str, float] = {}
    for key in keys:
        pairs = [
            (r[key], r["examples"])
            for r in reports
            if key in r and r.get("examples", 0) > 0 and math.isfinite(r[key])
        ]
        weight = sum(n for _, n in pairs)
        if weight > 0:
            out[key] = sum(v * n for v, n in pairs) / weight
    out["examples"] = float(sum(r.get("examples", 0) for r in reports))
    return out
