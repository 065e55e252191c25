"""Adapter aggregation with update screening, as plain functions over tensors (no Flower).

A merchant's update is accepted only if it has exactly the global adapter's keys and shapes, finite
values, a positive example count, and an update norm within the round's bound (`server.robust`);
otherwise it is rejected and reported, never averaged. Accepted updates are combined by example-weighted
FedAvg with capped weights, or by a coordinate-wise trimmed mean or median, into one delta that the
server optimizer (`server.server_opt`) applies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from server.robust import (
    MIN_UPDATES_FOR_MEDIAN,
    cap_weights,
    coordinate_median,
    norm_bound,
    trimmed_mean,
)
from shared.adapters import AdapterSpec, AdapterState, OutgoingGuardError
from shared.config import AGGREGATIONS, RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """One merchant's trained adapter and the number of examples it was trained on."""

    merchant: str
    adapter: AdapterState
    examples: int


def claimed_examples(value: object) -> int:
    """A merchant's reported example count as an int; 0 (so the update is rejected) for anything that
    is not a finite number, instead of crashing the round on `int(nan)`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return int(value)


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
    for key, tensor in update.adapter.items():
        if not bool(torch.isfinite(tensor).all()):
            return f"non-finite values in {key}"
    norm = update_norm(update.adapter, global_adapter)
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:.3g}"
    return None


def update_norm(adapter: Mapping[str, torch.Tensor], global_adapter: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of `adapter` − `global_adapter` over every tensor together (float64)."""
    squared = 0.0
    for key, tensor in adapter.items():
        squared += float(((tensor.to(torch.float64) - global_adapter[key].to(torch.float64)) ** 2).sum())
    return math.sqrt(squared)


def fedavg(updates: Sequence[Update], weights: Sequence[float] | None = None) -> AdapterState:
    """Weighted average of adapters, Σ nᵢ·wᵢ / Σ nᵢ in float64 (nᵢ: `weights`, else the claimed counts)."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    ns = [float(u.examples) for u in updates] if weights is None else [float(w) for w in weights]
    if len(ns) != len(updates):
        raise ValueError(f"fedavg got {len(ns)} weights for {len(updates)} updates")
    total = sum(ns)
    if total <= 0:
        raise ValueError("fedavg needs a positive total number of examples")
    averaged: AdapterState = {}
    for key, first in updates[0].adapter.items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for u, n in zip(updates, ns, strict=True):
            acc += u.adapter[key].to(torch.float64) * (n / total)
        averaged[key] = acc.to(first.dtype)
    return averaged


@dataclass(frozen=True)
class RobustPolicy:
    """How the coordinator bounds what merchants send (run config keys in parentheses)."""

    aggregation: str = "fedavg"  # (aggregation) fedavg | robust | trimmed-mean | median
    trim_fraction: float = 0.25  # (trim-fraction) dropped at each end per coordinate by trimmed-mean
    update_norm_factor: float = 3.0  # (update-norm-factor) reject norms above this x the round's median
    max_update_norm: float = 100.0  # (max-update-norm) absolute ceiling, the only bound of a small round
    max_weight_factor: float = 3.0  # (max-weight-factor) example claims clipped to this x the median

    @classmethod
    def of(cls, cfg: RunConfig) -> RobustPolicy:
        """The policy a run config asks for."""
        return cls(
            aggregation=cfg.aggregation,
            trim_fraction=cfg.trim_fraction,
            update_norm_factor=cfg.update_norm_factor,
            max_update_norm=cfg.max_update_norm,
            max_weight_factor=cfg.max_weight_factor,
        )

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation: unknown {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
            )


@dataclass(frozen=True)
class Screening:
    """One round's verdict: accepted updates with their capped weights, and why the others were refused."""

    accepted: list[Update]
    weights: list[float]
    rejected: dict[str, str] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    bound: float = math.inf
    round_median: float | None = None  # this round's median norm, when it had enough updates


def screen_updates(
    updates: Sequence[Update],
    global_adapter: Mapping[str, torch.Tensor],
    policy: RobustPolicy,
    *,
    norm_history: Sequence[float] = (),
) -> Screening:
    """Validate every update, bound the norms relative to the round's median, cap the weights.

    `norm_history` holds earlier rounds' median norms: a round with fewer than three valid updates
    is bounded by them (and by `max_update_norm`), not by a median one merchant could set.
    """
    rejected: dict[str, str] = {}
    valid: list[Update] = []
    for u in updates:
        reason = validate_update(u, global_adapter)
        if reason is None:
            valid.append(u)
        else:
            rejected[u.merchant] = reason
    norms = {u.merchant: update_norm(u.adapter, global_adapter) for u in valid}
    bound, reference, source = norm_bound(
        list(norms.values()),
        factor=policy.update_norm_factor,
        absolute=policy.max_update_norm,
        history=norm_history,
    )
    log.info(
        "update norms %s; bound %.3g (%s)", ", ".join(f"{k} {v:.3g}" for k, v in norms.items()), bound, source
    )
    basis = (
        f"{policy.update_norm_factor:g} x the {source} median {reference:.3g}"
        if reference and bound < policy.max_update_norm
        else "max-update-norm"
    )
    accepted = []
    for u in valid:
        if norms[u.merchant] > bound:
            rejected[u.merchant] = (
                f"update norm {norms[u.merchant]:.3g} exceeds the bound {bound:.3g} ({basis})"
            )
        else:
            accepted.append(u)
    weights = cap_weights([float(u.examples) for u in accepted], factor=policy.max_weight_factor)
    for u, w in zip(accepted, weights, strict=True):
        if w < u.examples:
            log.warning(
                "%s claims %d examples; weighted as %.0f (max-weight-factor)", u.merchant, u.examples, w
            )
    round_median = reference if source == "round" else None
    return Screening(accepted, weights, rejected, norms, bound, round_median)


def aggregate_delta(
    screening: Screening, global_adapter: Mapping[str, torch.Tensor], policy: RobustPolicy
) -> dict[str, torch.Tensor]:
    """The round's aggregated change to the global adapter (float64), by `policy.aggregation`.

    Trimmed mean and median are unweighted (a claimed count gives no extra say per coordinate), and
    computed on deltas, which is the same as on adapters: both are translation-equivariant.
    "robust" (for merchants that do not trust each other) is the trimmed mean with at least one value
    dropped at each end from three updates on, so every coordinate of the step stays within the honest
    merchants' range whatever one merchant sends; with one or two updates it is the weighted FedAvg
    and says it cannot promise that.
    """
    if policy.aggregation == "robust" and len(screening.accepted) < MIN_UPDATES_FOR_MEDIAN:
        log.warning(
            "%d accepted update(s): with fewer than %d merchants one merchant can steer the step "
            "(robust aggregation falls back to weighted FedAvg)",
            len(screening.accepted),
            MIN_UPDATES_FOR_MEDIAN,
        )
    if not screening.accepted:
        raise ValueError("aggregation needs at least one accepted update")
    out: dict[str, torch.Tensor] = {}
    for key, g in global_adapter.items():
        base = g.to(torch.float64)
        deltas = [u.adapter[key].to(torch.float64) - base for u in screening.accepted]
        if policy.aggregation == "median":
            out[key] = coordinate_median(deltas)
        elif policy.aggregation == "trimmed-mean":
            out[key] = trimmed_mean(deltas, policy.trim_fraction)
        elif policy.aggregation == "robust" and len(deltas) >= MIN_UPDATES_FOR_MEDIAN:
            out[key] = trimmed_mean(deltas, policy.trim_fraction, at_least_one=True)
        else:  # fedavg, and "robust" below three updates (no rule can outvote one of two merchants)
            total = sum(screening.weights)
            out[key] = sum(
                (d * (w / total) for d, w in zip(deltas, screening.weights, strict=True)),
                torch.zeros_like(base),
            )
    return out


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
