"""A fast sweep of the head's DP recipe (optimizer, learning rate, clip, batch) on frozen features.

The backbone's mean-pooled features of every example are computed once; then federated rounds of
customer-level DP-SGD on the linear head alone run in milliseconds, with the project's own mechanism
pieces (`client.training.customer_dp.clip_and_sum` / `noisy_mean`), noise calibrated by
`shared.privacy.calibration.calibrate_noise` for the real plan (q = 1/⌈N/B⌉, ⌈N/B⌉ steps per epoch),
and example-weighted FedAvg. What it shows holds for the head-only (linear-probe) mode exactly and
guides the head's rate in LoRA+head mode, whose LoRA matrices it leaves out.

    python -m simulations.experiments.head_sweep --data /work/data/ret --merchants 5
    python -m simulations.experiments.head_sweep --data /work/data/ret --grid defaults --eps 1,3,8,1e6

Prints one JSON line per setting (also appended to `<out>/results.jsonl`, which `plot.py` reads):
pooled AUC and log loss on the same held-out customers as `simulations.experiments.utility`,
against the constant predictor's loss.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.ingest.data import Encoder
from client.training.customer_dp import clip_and_sum, noisy_mean
from client.training.loop import StepPlan
from shared.config import RunConfig, parse_sets
from shared.model import load_tokenizer, resolve_backbone
from shared.privacy.calibration import calibrate_noise
from shared.tasks import Candidate, up_to_k_per_customer
from simulations.experiments.utility import (
    CAPS_HELP,
    DELTA,
    Merchant,
    arm_local_lr,
    auc,
    load_merchants,
    log_loss,
    parse_caps,
    prepare,
)


@torch.no_grad()
def features(backbone: str, encoder: Encoder, candidates: list[Candidate]) -> torch.Tensor:
    """Mean-pooled last hidden states of the frozen backbone (what the head reads)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(resolve_backbone(backbone)).eval()
    out = []
    for start in range(0, len(candidates), 256):
        enc = encoder.encode(candidates[start : start + 256])
        hidden = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        mask = enc.attention_mask.unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.cat(out)


class Bank:
    """Features of every candidate, looked up by identity."""

    def __init__(self, candidates: list[Candidate], feats: torch.Tensor) -> None:
        self.index = {id(c): i for i, c in enumerate(candidates)}
        self.feats = feats

    def of(self, cands: list[Candidate]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self.index[id(c)] for c in cands], dtype=torch.long)
        return self.feats[rows], torch.tensor([c.label for c in cands])


def local_dp(
    w: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    owner: torch.Tensor,
    s: dict[str, Any],
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One merchant's round of customer-level DP-SGD on a softmax head (closed-form per-example grads)."""
    customers = int(owner.max()) + 1
    plan = StepPlan.of(customers, s["batch"], s.get("epochs", 1))
    w, b = w.clone().requires_grad_(False), b.clone()
    opt_state: dict[str, Any] = {
        "m": [torch.zeros_like(w), torch.zeros_like(b)],
        "v": [torch.zeros_like(w), torch.zeros_like(b)],
        "t": 0,
    }
    for _ in range(plan.steps):
        chosen = torch.nonzero(torch.rand(customers) < plan.sample_rate).flatten()
        mask = torch.isin(owner, chosen)
        xs, ys, os_ = x[mask], y[mask], owner[mask]
        p = torch.softmax(xs @ w.T + b, dim=1)
        err = p - torch.nn.functional.one_hot(ys, w.shape[0]).float()
        gw = torch.zeros((customers, *w.shape))
        gb = torch.zeros((customers, *b.shape))
        gw.index_add_(0, os_, err.unsqueeze(2) * xs.unsqueeze(1))
        gb.index_add_(0, os_, err)
        summed = clip_and_sum([gw[chosen], gb[chosen]], s["clip"])
        grads = noisy_mean(
            summed, noise_std=sigma * s["clip"], expected_customers=plan.sample_rate * customers
        )
        step(s, opt_state, [w, b], grads)
    return w, b


def step(
    s: dict[str, Any], state: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
) -> None:
    if s["opt"] == "sgd":
        for p, g in zip(params, grads, strict=True):
            p -= s["lr"] * g
        return
    state["t"] += 1
    t = state["t"]
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        state["m"][i] = 0.9 * state["m"][i] + 0.1 * g
        state["v"][i] = 0.999 * state["v"][i] + 0.001 * g * g
        mh, vh = state["m"][i] / (1 - 0.9**t), state["v"][i] / (1 - 0.999**t)
        p -= s["lr"] * (mh / (vh.sqrt() + 1e-8) + 0.01 * p)


@functools.cache
def _sigma(sample_rate: float, steps: int, rounds: int, eps: float) -> float:
    if eps >= 1e5:
        return 0.0
    return calibrate_noise(
        spent=[], sample_rate=sample_rate, steps_per_round=steps, rounds=rounds, max_epsilon=eps, delta=DELTA
    )


def run(
    merchants: list[Merchant],
    bank: Bank,
    held: tuple[torch.Tensor, torch.Tensor],
    s: dict[str, Any],
    eps: float,
    k: int,
    rounds: int,
) -> dict[str, Any]:
    dim = bank.feats.shape[1]
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn((2, dim), generator=gen) * 0.02, torch.zeros(2)
    for r in range(rounds):
        updates = []
        for m in merchants:
            chosen = up_to_k_per_customer(
                m.data.train_candidates, m.data.train_customers, k=k, round_seed=f"s{r}"
            )
            index: dict[str, int] = {}
            owner = torch.tensor([index.setdefault(c.customer_id, len(index)) for c in chosen])
            plan = StepPlan.of(len(index), s["batch"], s.get("epochs", 1))
            sigma = _sigma(plan.sample_rate, plan.steps, rounds, eps)
            x, y = bank.of(chosen)
            updates.append((local_dp(w, b, x, y, owner, s, sigma), len(chosen)))
        total = sum(n for _, n in updates)
        w = sum(u[0] * n for u, n in updates) / total  # type: ignore[assignment]
        b = sum(u[1] * n for u, n in updates) / total  # type: ignore[assignment]
    xh, yh = held
    p = torch.softmax(xh @ w.T + b, dim=1)[:, 1].numpy()
    # mean predicted purchase probability against the held-out rate: the head's calibration
    return {
        "auc": round(auc(yh.numpy(), p), 4),
        "loss": round(log_loss(yh.numpy(), p), 4),
        "mean_p": round(float(p.mean()), 4),
    }


RECIPE = ("epochs", "batch", "lr", "rounds", "k", "clip")
"""What `--grid recipe` varies (each a comma-separated option)."""


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def settings_grid(
    grid: str,
    cfg: RunConfig,
    eps: list[float],
    features: list[str],
    recipe: dict[str, list[float]] | None = None,
) -> list[dict[str, Any]]:
    """The settings to run: the run config's own recipe at each ε (`defaults`), the optimizer sweep
    (`full`), or the run config's recipe with local epochs × batch × rate × rounds × k × clip varied
    (`recipe`)."""
    if grid in ("recipe", "defaults"):  # `defaults`: the recipe with nothing varied
        norm = "raw" if cfg.pooling == "mean" else "l2"
        lists = (recipe or {}) if grid == "recipe" else {}
        return [
            {
                "eps": e,
                "features": norm,
                "opt": "adam",
                "lr": lr,
                "clip": clip,
                "batch": int(batch),
                "k": int(k),
                "epochs": int(epochs),
                "rounds": int(rounds),
            }
            for e, epochs, batch, lr, rounds, k, clip in itertools.product(
                eps,
                lists.get("epochs", [cfg.epochs]),
                lists.get("batch", [cfg.batch_size]),
                lists.get("lr", [cfg.learning_rate]),
                lists.get("rounds", [cfg.num_rounds]),
                lists.get("k", [cfg.examples_per_customer]),
                lists.get("clip", [cfg.max_grad_norm]),
            )
        ]
    return [
        {"eps": e, "features": f, "opt": opt, "lr": lr, "clip": clip, "batch": 64, "k": 4, "epochs": 1}
        for e, f, (opt, lr), clip in itertools.product(
            eps, features, [("adam", 0.03), ("adam", 0.1), ("sgd", 3.0)], [0.5, 1.0]
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--merchants", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/head-sweep"))
    parser.add_argument("--eps", default="8", help="comma-separated; ≥ 1e5 means no noise")
    parser.add_argument("--features", default="raw,l2", help="head input: raw mean pooling, l2-normalised")
    parser.add_argument(
        "--grid",
        choices=("full", "defaults", "recipe"),
        default="full",
        help="full: optimizer × rate × clip × features; defaults: the run config's recipe at each ε; "
        "recipe: the run config's recipe × --epochs × --batch × --lr × --rounds × --k × --clip",
    )
    for name in RECIPE:
        parser.add_argument(
            f"--{name}", type=floats, default=None, help=f"comma-separated {name} for --grid recipe"
        )
    parser.add_argument("--seeds", type=int, default=1, help="noise seeds per setting: mean and sd reported")
    parser.add_argument("--train-caps", type=parse_caps, default=None, help=CAPS_HELP)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = RunConfig.parse({"backbone": resolve_backbone(""), **parse_sets(args.set)})
    args.out.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.data, args.merchants, args.out, cfg)
    merchants = load_merchants(folders, cfg, args.out / "scratch", args.train_caps)
    every = [
        c
        for m in merchants
        for cs in (*m.data.train_candidates.values(), *m.data.eval_candidates.values())
        for c in cs
    ]
    encoder = Encoder(load_tokenizer(cfg.backbone), cfg.max_length)
    bank = Bank(every, features(cfg.backbone, encoder, every))
    held = bank.of([c for m in merchants for c in m.data.evaluation()])
    base = float(held[1].float().mean())
    header = {
        "data": args.data,
        "source": "head_sweep",
        "positive_rate": round(base, 4),
        "constant_loss": round(log_loss(held[1].numpy(), np.full(len(held[1]), base)), 4),
        "merchants": {m.name: len(m.data.train_customers) for m in merchants},
        "local_lr": arm_local_lr(merchants)["median_merchant_auc"],
        "config": {k: v for k, v in cfg.to_record().items() if k != "backbone"},
    }
    print(json.dumps(header), flush=True)
    raw = bank.feats
    recipe = {n: getattr(args, n) for n in RECIPE if getattr(args, n)}
    grid = settings_grid(args.grid, cfg, floats(args.eps), args.features.split(","), recipe)
    with (args.out / "results.jsonl").open("a") as sink:
        sink.write(json.dumps({"header": header}) + "\n")
        for s in grid:
            # "l2": the head reads the unit-length embedding, as sentence-transformers' MiniLM is trained
            bank.feats = raw if s["features"] == "raw" else torch.nn.functional.normalize(raw, dim=1)
            held = bank.of([c for m in merchants for c in m.data.evaluation()])
            runs = []
            for seed in range(1, args.seeds + 1):
                torch.manual_seed(seed)  # a study's noise; production noise is never seeded
                runs.append(run(merchants, bank, held, s, s["eps"], s["k"], s.get("rounds", cfg.num_rounds)))
            result = {
                key: round(float(np.mean([r[key] for r in runs])), 4) for key in ("auc", "loss", "mean_p")
            }
            if args.seeds > 1:
                result["auc_sd"] = round(float(np.std([r["auc"] for r in runs], ddof=1)), 4)
            eps = s["eps"] if s["eps"] < 1e5 else None
            tag = f"head-sweep-eps{s['eps']:g}" if eps is not None else "head-sweep-nodp"
            row = {"arm": tag, **s, "epsilon": eps, **result}
            print(json.dumps(row), flush=True)
            sink.write(json.dumps(row) + "\n")
    return 0 if math.isfinite(base) else 1


if __name__ == "__main__":
    raise SystemExit(main())
