"""The round loop of a run, independent of Flower: sample → train → validate → FedAvg → checkpoint →
evaluate → metrics. A `Federation` (Flower's Grid in production, plain calls in tests) carries the
messages.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from server.checkpoint import load_latest, save_checkpoint
from server.export import export_final
from server.metrics import FAILURE_FILE, GLOBAL_KEYS, MetricsLog, pool_evaluations, train_entry
from server.round_state import RoundState
from server.strategy import (
    RobustPolicy,
    Update,
    aggregate_delta,
    claimed_examples,
    screen_updates,
    weighted_metrics,
)
from shared.adapters import AdapterSpec, AdapterState, extract_adapter
from shared.config import RunConfig
from shared.fileio import atomic_write_json
from shared.model import build_model
from shared.protocol import EVALUATED

log = logging.getLogger(__name__)

TRAINED, REFUSED, REJECTED, FAILED = "trained", "refused-budget", "rejected-update", "failed"


class NoMerchantTrainedError(RuntimeError):
    """A round ended with no usable update: the run stops instead of silently keeping old weights."""


@dataclass
class Reply:
    """A merchant's answer to a train or evaluate request, already decoded from the transport."""

    node_id: int
    status: str
    merchant_id: str = ""
    adapter: AdapterState | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    reason: str = ""
    histograms: dict[str, list[float]] = field(default_factory=dict)  # evaluation: name → noisy counts
    privacy: dict[str, str] = field(default_factory=dict)  # train: accountant, privacy-unit

    @property
    def name(self) -> str:
        return self.merchant_id or f"node-{self.node_id}"


class Federation(Protocol):
    """How the coordinator reaches merchants."""

    def node_ids(self, minimum: int) -> list[int]: ...

    def train(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]: ...

    def evaluate(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]: ...


def sample_nodes(nodes: Sequence[int], fraction: float, minimum: int, rng: random.Random) -> list[int]:
    """max(minimum, ⌈fraction·n⌉) nodes (at most n), drawn without replacement."""
    k = min(len(nodes), max(minimum, round(fraction * len(nodes))))
    return sorted(rng.sample(sorted(nodes), k))


@dataclass
class RunPaths:
    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def failure(self) -> Path:
        return self.root / FAILURE_FILE


class Coordinator:
    """Runs `cfg.num_rounds` rounds of adapter FedAvg over a `Federation`, writing the run folder."""

    def __init__(
        self, cfg: RunConfig, federation: Federation, run_dir: Path, *, console: bool = True
    ) -> None:
        self.cfg = cfg
        self.federation = federation
        self.paths = RunPaths(run_dir)
        self.metrics = MetricsLog(self.paths.metrics, out=sys.stdout if console else None)
        self.model = build_model(
            cfg.backbone,
            num_labels=cfg.task_spec.num_labels,
            lora=cfg.lora,
            init_seed=cfg.seed,
            pooling=cfg.pooling,
        )
        self.rng = random.Random(cfg.seed)
        self.policy = RobustPolicy.of(cfg)
        self.round_state = RoundState(cfg, self.paths.checkpoints)  # server optimizer + norm history

    def run(self, *, resume: bool = False) -> Path:
        """Run every planned round (or the rest of them with `resume`) and export `final/`."""
        adapter = extract_adapter(self.model)
        start = 1
        restored = load_latest(self.paths.checkpoints) if resume else None
        if restored is not None:
            done, adapter = restored
            AdapterSpec.of(self.model).check(adapter, what="checkpoint")
            start = done + 1
            log.info("resuming after round %d from %s", done, self.paths.checkpoints)
        t0 = time.monotonic()
        if start == 1:
            self._evaluate(adapter, 0, {}, t0)
        for server_round in range(start, self.cfg.num_rounds + 1):
            adapter, merchants = self._train(adapter, server_round)
            save_checkpoint(self.paths.checkpoints, server_round, adapter, {"run": self.paths.root.name})
            self._evaluate(adapter, server_round, merchants, t0)
        export_final(self.model, adapter, self.paths.final, self.cfg)
        return self.paths.root

    def _fail(self, server_round: int, what: str, merchants: dict[str, dict[str, Any]]) -> NoReturn:
        """Stop the run, saying why: `failure.json` in the run folder (read by `coordinator status`
        and `run --wait`) and the error, each with every merchant's status and public reason."""
        entries = {
            k: {"status": v.get("status"), "reason": v.get("reason", "")} for k, v in merchants.items()
        }
        summary = ", ".join(
            f"{k}: {v['status']}" + (f" ({v['reason']})" if v["reason"] else "") for k, v in entries.items()
        )
        message = f"round {server_round}: {what} ({summary or 'no replies'})"
        atomic_write_json(self.paths.failure, {"round": server_round, "error": message, "merchants": entries})
        raise NoMerchantTrainedError(message)

    def _sample(self, fraction: float, minimum: int) -> list[int]:
        """Wait for min-available-nodes merchants, then draw this round's participants."""
        return sample_nodes(
            self.federation.node_ids(self.cfg.min_available_nodes), fraction, minimum, self.rng
        )

    def _train(
        self, adapter: AdapterState, server_round: int
    ) -> tuple[AdapterState, dict[str, dict[str, Any]]]:
        cfg = self.cfg
        nodes = self._sample(cfg.fraction_train, cfg.min_train_nodes)
        self.round_state.before(server_round)  # on resume: the optimizer state saved with the checkpoint
        replies = self.federation.train(nodes, adapter, cfg, server_round)
        updates: list[Update] = []
        merchants: dict[str, dict[str, Any]] = {}
        for reply in replies:
            status = reply.status
            if status == TRAINED:
                updates.append(
                    Update(reply.name, reply.adapter or {}, claimed_examples(reply.metrics.get("examples")))
                )
            elif reply.reason:
                log.warning("round %d: %s %s: %s", server_round, reply.name, status, reply.reason)
            merchants[reply.name] = train_entry(
                status,
                reply.metrics,
                reply.privacy,
                examples=claimed_examples(reply.metrics.get("examples")),
                bytes_up=reply.bytes_up,
            )
            if status != TRAINED:  # the merchant's fixed reason (budget, policy, …) or the coordinator's note
                merchants[reply.name]["reason"] = reply.reason
        screening = screen_updates(updates, adapter, self.policy, norm_history=self.round_state.norm_history)
        for name, reason in screening.rejected.items():
            merchants[name]["status"] = REJECTED
            log.warning("round %d: update of %s rejected: %s", server_round, name, reason)
        if not screening.accepted:
            self._fail(server_round, "no merchant produced a usable update", merchants)
        new_adapter = self.round_state.optimizer.step(
            adapter, aggregate_delta(screening, adapter, self.policy)
        )
        self.round_state.after(server_round, screening.round_median)
        return new_adapter, merchants

    def _evaluate(
        self, adapter: AdapterState, server_round: int, merchants: dict[str, dict[str, Any]], t0: float
    ) -> dict[str, Any]:
        cfg = self.cfg
        nodes = self._sample(cfg.fraction_evaluate, cfg.min_evaluate_nodes)
        received = self.federation.evaluate(nodes, adapter, cfg, server_round)
        # a merchant may refuse: its budget, its evaluation limit, its policy
        answered = [r for r in received if r.status in (EVALUATED, REFUSED)]
        replies = [r for r in answered if r.status == EVALUATED]
        if not replies:
            self._fail(
                server_round,
                "no merchant returned an evaluation",
                {r.name: {"status": r.status, "reason": r.reason} for r in received},
            )
        pooled, own = pool_evaluations(
            {r.name: r.histograms for r in replies},
            cfg.task_spec.num_labels,
            noise={
                r.name: r.metrics["eval_noise_multiplier"]
                for r in replies
                if "eval_noise_multiplier" in r.metrics
            },
        )
        for r in answered:
            if r.name not in merchants and server_round > 0 and r.status != EVALUATED:
                # a row lists this round's trainers and every merchant whose evaluation it charged (a
                # merchant sampled to evaluate but not to train has spent budget: its epsilon belongs
                # in the run's provenance); a refused evaluation by a non-trainer spent nothing
                continue
            entry = merchants.setdefault(r.name, {"status": EVALUATED})
            entry.update(own.get(r.name, {}))
            # the epsilon it reports after charging this evaluation: the round's last word on its spend
            epsilon = {"epsilon": r.metrics.get("epsilon")}
            entry["evaluation"] = {"status": r.status, **epsilon, **entry.get("evaluation", {})}
        row = {
            "round": server_round,
            "time_s": round(time.monotonic() - t0, 3),
            # replies without histograms (test federations) are averaged, weighted by examples
            "global": pooled or weighted_metrics([r.metrics for r in replies], GLOBAL_KEYS),
            "merchants": merchants,
        }
        self.metrics.write(row)
        return row
