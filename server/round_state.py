"""The coordinator's own state carried from round to round: the server optimizer's moments and the
history of median update norms (the bound of rounds with too few updates for a median of their own).

Saved after every round beside the adapter checkpoint and restored when a resumed run reaches its
first round, so a resumed run continues the same trajectory and the same bounds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.checkpoint import load_server_state, save_server_state
from server.server_opt import ServerOptimizer
from shared.config import RunConfig

log = logging.getLogger(__name__)

# Earlier rounds' medians kept as the fallback reference; recent ones only, as update sizes drift.
HISTORY_ROUNDS = 10


class RoundState:
    """Server optimizer + norm history, valid after round `self.round` (0: nothing happened yet)."""

    def __init__(self, cfg: RunConfig, folder: Path) -> None:
        self.folder = folder
        self.optimizer = ServerOptimizer(
            cfg.server_optimizer, learning_rate=cfg.server_learning_rate, momentum=cfg.server_momentum
        )
        self.norm_history: list[float] = []
        self.round = 0

    def before(self, server_round: int) -> None:
        """Make the state the one saved after `server_round - 1` (a no-op when it already is)."""
        previous = server_round - 1
        if previous == self.round:
            return
        saved = load_server_state(self.folder, previous)
        if saved is None:
            # a checkpoint from before server state existed: plain FedAvg needs none; others restart
            log.warning(
                "no server state for round %d in %s: server optimizer starts afresh", previous, self.folder
            )
        else:
            tensors, meta = saved
            settings, history = meta.get("optimizer"), meta.get("norm_history")
            self.optimizer.load_state_dict(tensors, settings if isinstance(settings, dict) else {})
            self.norm_history = [float(x) for x in history] if isinstance(history, list) else []
        self.round = previous

    def after(self, server_round: int, round_median: float | None) -> None:
        """Record the round's median norm (if it had one) and save the state for a resume."""
        if round_median is not None:
            self.norm_history = [*self.norm_history, round_median][-HISTORY_ROUNDS:]
        self.round = server_round
        meta: dict[str, object] = {"optimizer": self.optimizer.describe(), "norm_history": self.norm_history}
        save_server_state(self.folder, server_round, self.optimizer.state_dict(), meta)
