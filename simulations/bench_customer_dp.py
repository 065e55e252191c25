"""Customer-level DP-SGD: examples used per round and local training time, k=1 against larger k.

    .venv/bin/python -m simulations.bench_customer_dp [--merchants 4] [--customers 500] [--ks 1,4,8]
                                                      [--time-ks 1,4] [--backbone ID] [--device auto]

k is `examples-per-customer`: a sampled customer contributes up to k of its sessions, summed into one
clipped gradient. Uses the demo's synthetic merchants (sim-seed 7) and the merchant's own code path
(`MerchantData.train_round`, `train_dp` with the run config's defaults), so the figures are those of a
merchant's round. Prints, per merchant, training customers, training sessions and the examples one
round uses for each k; then the wall and CPU time of one local round (one epoch) on merchant 0 for
each k (CPU time, summed over threads, is the fairer figure on a shared machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from client.ingest.data import Encoder, MerchantData, load_events
from client.training.loop import DPSettings, TrainSettings, customer_groups, train_dp
from shared.config import RunConfig
from shared.model import build_model, load_tokenizer, resolve_backbone, resolve_device
from simulations.synthetic import generate_merchant


def merchants(n: int, customers: int, seed: int, cfg: RunConfig) -> list[MerchantData]:
    """The demo's synthetic merchants, built as a merchant builds its data."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            folder = Path(tmp) / f"merchant-{i}"
            generate_merchant(seed, i, folder, base_customers=customers)
            events, report = load_events(folder, folder / "state")
            out.append(
                MerchantData.build(
                    events, cfg.task_spec, eval_fraction=0.2, salt=f"merchant-{i}", report=report
                )
            )
    return out


def print_examples(data: list[MerchantData], ks: list[int]) -> None:
    print("merchant  customers  sessions  " + "  ".join(f"k={k:<3d}" for k in ks) + "   (examples per round)")
    totals = [0] * len(ks)
    for i, d in enumerate(data):
        used = [len(d.train_round("bench:1", k)) for k in ks]
        totals = [t + u for t, u in zip(totals, used, strict=True)]
        sessions = sum(len(c) for c in d.train_candidates.values())
        print(
            f"{i:>8d}  {len(d.train_customers):>9d}  {sessions:>8d}  " + "  ".join(f"{u:>5d}" for u in used)
        )
    sessions = sum(sum(len(c) for c in d.train_candidates.values()) for d in data)
    share = "  ".join(f"{t / sessions:5.0%}" for t in totals)
    print(f"{'all':>8}  {sum(len(d.train_customers) for d in data):>9d}  {sessions:>8d}  {share}")


def time_rounds(
    data: MerchantData, ks: list[int], cfg: RunConfig, backbone: str, device: torch.device
) -> None:
    encoder = Encoder(load_tokenizer(backbone), cfg.max_length)
    settings = TrainSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lora_learning_rate=cfg.lora_learning_rate,
    )
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=cfg.max_grad_norm)
    print(f"\none local round on merchant 0: {backbone}, {device}, torch threads {torch.get_num_threads()}")
    base = None
    for k in ks:
        chosen = data.train_round("bench:1", k)
        encoded = encoder.encode(chosen)
        model = build_model(backbone, num_labels=cfg.task_spec.num_labels, lora=cfg.lora, device=str(device))
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train_dp(
            model,
            encoded,
            settings=settings,
            dp=dp,
            device=device,
            groups=customer_groups([c.customer_id for c in chosen]),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        base = base or cpu
        print(
            f"k={k:<3d} {len(chosen):>5d} examples of {result.customers} customers, {result.steps} steps: "
            f"{seconds:6.1f} s wall, {cpu:6.1f} s CPU ({len(chosen) / cpu:5.1f} examples per CPU s, "
            f"×{cpu / base:.2f} of k={ks[0]})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merchants", type=int, default=4)
    parser.add_argument(
        "--customers", type=int, default=500, help="base customers per merchant (sim-customers)"
    )
    parser.add_argument("--seed", type=int, default=7, help="sim-seed")
    parser.add_argument("--ks", default="1,2,4,8", help="examples-per-customer values to count")
    parser.add_argument("--time-ks", default="1,4", help="values to time (empty: no timing)")
    parser.add_argument("--backbone", default="")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    cfg = RunConfig()
    data = merchants(args.merchants, args.customers, args.seed, cfg)
    print_examples(data, [int(k) for k in args.ks.split(",")])
    if args.time_ks:
        time_ks = [int(k) for k in args.time_ks.split(",")]
        time_rounds(data[0], time_ks, cfg, resolve_backbone(args.backbone), resolve_device(args.device))


if __name__ == "__main__":
    main()
