"""Server-side optimizers on the round's aggregated adapter delta: FedAvg, FedAvgM, FedAdam.

The aggregate Δ = aggregate(wᵢ) − w of the accepted updates is treated as a pseudo-gradient
(Reddi et al., "Adaptive Federated Optimization", ICLR 2021; Hsu et al. 2019 for momentum):

- fedavg:  w ← w + η·Δ                                  (η = 1 is plain FedAvg)
- fedavgm: m ← β·m + Δ;  w ← w + η·m
- fedadam: m ← β₁·m + (1−β₁)·Δ;  v ← β₂·v + (1−β₂)·Δ²;  w ← w + η·m / (√v + τ)   (no bias correction,
  as in Reddi et al.'s algorithm)

This is post-processing of values the merchants already released: it costs no privacy. The state
(m, v, step) is kept by the coordinator across rounds and saved with each checkpoint, so a resumed
run continues the same trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shared.adapters import AdapterState
from shared.config import SERVER_OPTIMIZERS

# FedAdam's second-moment decay and adaptivity τ: Reddi et al.'s values (β₂ = 0.99, τ = 1e-3). τ also
# damps coordinates whose deltas are tiny (DP-noised LoRA matrices) instead of inflating them to ±η.
FEDADAM_BETA2 = 0.99
FEDADAM_TAU = 1e-3

STEP_KEY = "step"


def default_learning_rate(kind: str, momentum: float) -> float:
    """η when `server-learning-rate` is 0: FedAvg's 1; FedAvgM's 1−β (an effective rate η/(1−β) of 1,
    Hsu et al.'s recommendation); FedAdam's 1e-2 (each coordinate then moves at most about 0.01 a
    round, the order of the merchants' own LoRA steps)."""
    if kind == "fedavg":
        return 1.0
    if kind == "fedavgm":
        return 1.0 - momentum
    if kind == "fedadam":
        return 1e-2
    raise ValueError(f"server-optimizer: unknown {kind!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")


class ServerOptimizer:
    """Applies the aggregated delta to the global adapter; holds momentum state between rounds."""

    def __init__(self, kind: str, *, learning_rate: float = 0.0, momentum: float = 0.9) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server-optimizer: unknown {kind!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server-momentum must be in [0, 1), got {momentum}")
        self.kind = kind
        self.momentum = momentum
        self.learning_rate = learning_rate or default_learning_rate(kind, momentum)
        self.steps = 0
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, adapter: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> AdapterState:
        """The new global adapter (each tensor in `adapter`'s dtype); updates the state in place."""
        if set(adapter) != set(delta):
            raise ValueError("server optimizer: the delta's keys differ from the global adapter's")
        out: AdapterState = {}
        for key, tensor in adapter.items():
            d = delta[key].to(torch.float64)
            out[key] = (tensor.to(torch.float64) + self.learning_rate * self._direction(key, d)).to(
                tensor.dtype
            )
        self.steps += 1
        return out

    def _direction(self, key: str, d: torch.Tensor) -> torch.Tensor:
        if self.kind == "fedavg":
            return d
        m = self.m.get(key, torch.zeros_like(d))
        if self.kind == "fedavgm":
            self.m[key] = self.momentum * m + d
            return self.m[key]
        v = self.v.get(key, torch.zeros_like(d))
        self.m[key] = self.momentum * m + (1.0 - self.momentum) * d
        self.v[key] = FEDADAM_BETA2 * v + (1.0 - FEDADAM_BETA2) * d * d
        return self.m[key] / (self.v[key].sqrt() + FEDADAM_TAU)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint: `m/<key>`, `v/<key>` and the step count."""
        state = {f"m/{k}": t for k, t in self.m.items()}
        state.update({f"v/{k}": t for k, t in self.v.items()})
        state[STEP_KEY] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def describe(self) -> dict[str, object]:
        """The settings a checkpoint records, checked again on resume."""
        return {"kind": self.kind, "learning_rate": self.learning_rate, "momentum": self.momentum}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], settings: Mapping[str, object]) -> None:
        """Continue from a checkpoint; refuse one written by a different optimizer.

        Why refuse: FedAdam's `v` or FedAvgM's velocity would be silently dropped or misread, and the
        resumed run would no longer be the run that was planned.
        """
        if settings.get("kind") != self.kind:
            raise ValueError(
                f"server-optimizer: the checkpoint was written with {settings.get('kind')!r}, this run "
                f"asks for {self.kind!r}; resume with server-optimizer={settings.get('kind')!r} or "
                "start a new run-name"
            )
        self.steps = int(state[STEP_KEY]) if STEP_KEY in state else 0
        self.m = {k[2:]: t.to(torch.float64) for k, t in state.items() if k.startswith("m/")}
        self.v = {k[2:]: t.to(torch.float64) for k, t in state.items() if k.startswith("v/")}
