"""A fabricated finished run on a tiny BERT: `final/` written by `server.export.export_final` with
non-zero LoRA and head weights, and a `metrics.jsonl` that follows the contract in DESIGN.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from server.export import export_final
from shared.adapters import extract_adapter
from shared.config import RunConfig
from shared.model import build_model


def metrics_rows() -> list[dict[str, Any]]:
    """Round 0 (initial adapter) and two rounds: m1 trains twice, m2 is refused its budget in round 2."""

    def merchant(status: str, eps: float | None, bytes_up: int, **extra: Any) -> dict[str, Any]:
        return {
            "status": status,
            "epsilon": eps,
            "delta": 1e-6,
            "examples": 40,
            "bytes_up": bytes_up,
            **extra,
        }

    def glob(accuracy: float, macro_f1: float, loss: float) -> dict[str, float]:
        return {"accuracy": accuracy, "macro_f1": macro_f1, "loss": loss, "examples": 20}

    return [
        {"round": 0, "time_s": 0.5, "global": glob(0.5, 0.33, 0.7), "merchants": {}},
        {"round": 1, "time_s": 2.0, "global": glob(0.6, 0.5, 0.65),
         "merchants": {"m1": merchant("trained", 2.5, 1000, steps=7, noise_multiplier=1.1),
                       "m2": merchant("trained", 3.0, 1200)}},
        {"round": 2, "time_s": 3.5, "global": glob(0.7, 0.6, 0.6),
         "merchants": {"m1": merchant("trained", 4.0, 1000, steps=8, noise_multiplier=1.1),
                       "m2": merchant("refused-budget", 3.0, 0)}},
    ]  # fmt: skip


def make_run(root: Path, backbone: str, *, task: str = "purchase-intent", pooling: str = "mean-l2") -> Path:
    """Write `root/final/` and `root/metrics.jsonl` of a two-round run; return `root`."""
    cfg = RunConfig.parse(
        {"backbone": backbone, "task": task, "pooling": pooling, "num-rounds": 2, "max-length": 32}
    )
    model = build_model(backbone, num_labels=cfg.task_spec.num_labels, lora=cfg.lora, pooling=pooling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        # lora_B starts at zero: give every adapter tensor values, so a missed merge changes outputs
        adapter = {k: torch.randn_like(v) * 0.3 for k, v in extract_adapter(model).items()}
    rows = metrics_rows()
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    export_final(model, adapter, root / "final", cfg)
    return root
