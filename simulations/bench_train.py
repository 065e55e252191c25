"""Training throughput: examples/s of one local epoch with DP-SGD (Opacus) and without, in one run;
then the linear probe (`trainable=head`) over `--head-epochs` epochs, with the backbone run once per
round on frozen features (the default) and once per step, and their ratio.

    .venv/bin/python -m simulations.bench_train [--examples 512] [--batch-size 64] [--backbone ID]
                                                [--max-length 48] [--device auto] [--head-epochs 3]

Uses a synthetic merchant's purchase-intent examples and the project's own model and training loop,
so the figures are those of a merchant's round. Prints examples/s for both and their ratio; on a GPU
(`--device cuda`) it also prints the peak memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from client.ingest.data import Encoder, MerchantData, load_events
from client.ingest.encoded import Encoded
from client.training.loop import DPSettings, TrainSettings, make_optimizer, train_dp
from shared.model import build_model, load_tokenizer, resolve_backbone, resolve_device
from shared.model_spec import LoraSpec
from shared.tasks import get_task
from simulations.synthetic import generate_merchant


def examples(n: int, backbone: str, max_length: int) -> Encoded:
    with tempfile.TemporaryDirectory() as tmp:
        generate_merchant(7, 0, Path(tmp), base_customers=max(50, n))
        events, report = load_events(Path(tmp), Path(tmp) / "state")
    data = MerchantData.build(
        events, get_task("purchase-intent"), eval_fraction=0.1, salt="bench", report=report
    )
    chosen = [c for cands in data.train_candidates.values() for c in cands][:n]
    return Encoder(load_tokenizer(backbone), max_length).encode(chosen)


def plain_epoch(model: torch.nn.Module, data: Encoded, batch_size: int, device: torch.device) -> None:
    """The same model and optimizer without Opacus: per-batch gradients, no clipping, no noise."""
    model.train()
    optimizer = make_optimizer(model, TrainSettings(batch_size=batch_size))
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        optimizer.zero_grad(set_to_none=True)
        logits = model(
            input_ids=data.input_ids[sl].to(device), attention_mask=data.attention_mask[sl].to(device)
        ).logits
        torch.nn.functional.cross_entropy(logits, data.labels[sl].to(device)).backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--backbone", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--head-epochs", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    backbone = resolve_backbone(args.backbone)
    data = examples(args.examples, backbone, args.max_length)
    model = build_model(backbone, num_labels=2, lora=LoraSpec(trainable="lora+head"), device=device)
    print(
        f"backbone {backbone}\ndevice {device}, {len(data)} examples, batch {args.batch_size}, "
        f"max length {args.max_length}, torch threads {torch.get_num_threads()}"
    )
    plain_epoch(model, data, args.batch_size, device)  # warm-up
    timings = {}
    for name in ("plain", "dp"):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if name == "plain":
            plain_epoch(model, data, args.batch_size, device)
        else:
            train_dp(
                model,
                data,
                settings=TrainSettings(batch_size=args.batch_size),
                dp=DPSettings(noise_multiplier=1.0, max_grad_norm=0.5),
                device=device,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
        extra = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""
        print(f"{name:>5}: {timings[name]:6.2f} s  {len(data) / timings[name]:8.1f} examples/s{extra}")
    print(f"DP / plain throughput: {timings['plain'] / timings['dp']:.2f}")
    head = build_model(backbone, num_labels=2, lora=LoraSpec(trainable="head"), device=device)
    for frozen in (False, True):
        settings = TrainSettings(batch_size=args.batch_size, epochs=args.head_epochs, frozen_features=frozen)
        start = time.perf_counter()
        train_dp(head, data, settings=settings, dp=DPSettings(1.0, 1.0), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        name = "frozen features" if frozen else "per step"
        timings[name] = time.perf_counter() - start
        rate = len(data) * args.head_epochs / timings[name]
        print(f"head, {args.head_epochs} epochs, {name:>15}: {timings[name]:6.2f} s  {rate:8.1f} examples/s")
    print(
        f"head: frozen features / per step throughput: {timings['per step'] / timings['frozen features']:.2f}"
    )


if __name__ == "__main__":
    main()
