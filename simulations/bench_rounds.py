"""Head-mode round times with the merchant's feature cache: round 1 against later rounds, and a second
run on the same data, at the demo's size (`fedbehavior simulate`'s 4 merchants of `sim-customers`).

    .venv/bin/python -m simulations.bench_rounds [--merchants 4] [--customers 500] [--rounds 5]
                                                 [--backbone ID] [--device auto] [--baseline-rounds 2]

Three runs of the same plan (the run config's defaults: `trainable=head`, the packaged MiniLM-L6),
each over fresh copies of the same synthetic merchants, through the merchants' own ClientApp code
(`simulations.inprocess`: the Flower transport and Ray are left out, everything a merchant does in a
round is in):
  1. without the cache (`feature-cache-mb = 0`): what every round cost before it (`--baseline-rounds`
     rounds only, 0 to skip: without the cache a later round costs what round 1 does);
  2. with the cache, empty: round 0 (the initial evaluation) embeds the held-out texts, round 1 the
     training texts, later rounds only texts no earlier round picked;
  3. a second run (a new ledger, a new process's in-memory state) over the first run's cache.
Each run starts as a new process would (model, tokenizer and data loaded again, in round 0). Prints
each round's wall time (train + evaluate messages of all merchants, plus the coordinator's share) and
later-round ÷ round-1 time (goal ≤ 0.2).

On a busy 2-core host, torch's default of one thread per core makes the head's small DP-SGD steps on
cached features several times slower than one thread does (OpenMP threads wait on each other):
`--threads 1` shows what a later round costs when they do not.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from client import merchant
from client.training.feature_cache import open_cache
from server.coordinator import Coordinator, Reply
from shared.adapters import AdapterState
from shared.config import RunConfig
from simulations.inprocess import InProcessFederation
from simulations.synthetic import ensure_merchant


class TimedFederation(InProcessFederation):
    """The in-process federation, timing each round's merchant messages."""

    def __init__(self, merchant_dirs: Sequence[Path], run_key: str) -> None:
        super().__init__(merchant_dirs, run_key)
        self.merchant_s: dict[int, float] = defaultdict(float)
        self.round_start: dict[int, float] = {}
        self.round_end: dict[int, float] = {}

    def _timed(
        self, kind: str, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, rnd: int
    ) -> list[Reply]:
        start = time.perf_counter()
        self.round_start.setdefault(rnd, start)
        replies = self._round_trip(kind, nodes, adapter, cfg, rnd)
        self.round_end[rnd] = time.perf_counter()
        self.merchant_s[rnd] += self.round_end[rnd] - start
        bad = [r for r in replies if r.status not in ("trained", "evaluated")]
        if bad:
            raise RuntimeError(f"round {rnd} {kind}: {[(r.name, r.status, r.reason) for r in bad]}")
        return replies

    def train(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        return self._timed("train", nodes, adapter, cfg, server_round)

    def evaluate(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        return self._timed("evaluate", nodes, adapter, cfg, server_round)

    def round_s(self) -> list[float]:
        """Wall time of each round, from its first message to the next round's first (the last round:
        to its last reply), so the coordinator's aggregation and checkpoint are counted too."""
        rounds = sorted(self.round_start)
        return [
            (self.round_start[r + 1] if r + 1 in self.round_start else self.round_end[r])
            - self.round_start[r]
            for r in rounds
        ]


def fresh_process_state() -> None:
    """Forget what this process holds (model, tokenizer, data, cache index): a new process's start."""
    merchant.cached_model.cache_clear()
    merchant.cached_encoder.cache_clear()
    merchant.cached_data.cache_clear()
    open_cache.cache_clear()


def copy_merchants(
    sources: list[Path], to: Path, *, cache_mb: int, device: str, cache_from: Path | None
) -> list[Path]:
    """Fresh merchant folders with the same data (and, from `cache_from`, the same feature cache)."""
    folders = []
    for source in sources:
        folder = to / source.name
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("state"))
        settings = json.loads((folder / "merchant.json").read_text(encoding="utf-8"))
        settings.update(feature_cache_mb=cache_mb, device=device)
        (folder / "merchant.json").write_text(json.dumps(settings), encoding="utf-8")
        if cache_from is not None:
            shutil.copytree(
                cache_from / source.name / "state" / "feature-cache", folder / "state" / "feature-cache"
            )
        folders.append(folder)
    return folders


def run(label: str, cfg: RunConfig, folders: list[Path], run_dir: Path) -> list[float]:
    fresh_process_state()
    federation = TimedFederation(folders, run_key=run_dir.name)
    start = time.perf_counter()
    Coordinator(cfg, federation, run_dir, console=False).run()
    total = time.perf_counter() - start
    rounds = federation.round_s()
    print(
        f"{label:<22} total {total:7.1f} s | "
        + " ".join(f"r{i} {t:6.1f}" for i, t in enumerate(rounds))
        + f" | later ÷ r1 {ratio(rounds):.3f}",
        flush=True,
    )
    return rounds


def ratio(rounds: list[float]) -> float:
    """Mean time of rounds 2… over round 1's (round 0 is the initial evaluation)."""
    return statistics.mean(rounds[2:]) / rounds[1] if len(rounds) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = RunConfig.parse({})
    parser.add_argument("--merchants", type=int, default=4)
    parser.add_argument("--customers", type=int, default=defaults.sim_customers)
    parser.add_argument("--rounds", type=int, default=defaults.num_rounds)
    parser.add_argument("--backbone", default="", help="empty: the packaged MiniLM-L6")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-mb", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--baseline-rounds", type=int, default=2, help="rounds of the run without the cache")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (default: a temp folder)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for name in ("flwr", "client", "server", "shared"):  # one line per run is the output
        logging.getLogger(name).setLevel(logging.WARNING)

    cfg = RunConfig.parse(
        {
            "backbone": args.backbone,
            "num-rounds": args.rounds,
            "min-available-nodes": args.merchants,
            "min-train-nodes": args.merchants,
            "min-evaluate-nodes": args.merchants,
        }
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rounds-"))
    sources = [
        ensure_merchant(cfg.sim_seed, i, work / "data" / f"merchant-{i}", base_customers=args.customers)
        for i in range(args.merchants)
    ]
    print(
        f"{args.merchants} merchants × {args.customers} customers (sim-seed {cfg.sim_seed}), "
        f"{args.rounds} rounds, trainable={cfg.trainable}, backbone {args.backbone or 'packaged MiniLM-L6'}, "
        f"max-length {cfg.max_length}, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, list[float]] = {}
    if args.baseline_rounds > 0:
        folders = copy_merchants(sources, work / "off", cache_mb=0, device=args.device, cache_from=None)
        baseline = cfg.model_copy(update={"num_rounds": args.baseline_rounds})
        results["no cache"] = run("no cache", baseline, folders, work / "runs" / "off")
    first = copy_merchants(
        sources, work / "first", cache_mb=args.cache_mb, device=args.device, cache_from=None
    )
    results["cache, first run"] = run("cache, first run", cfg, first, work / "runs" / "first")
    second = copy_merchants(
        sources, work / "second", cache_mb=args.cache_mb, device=args.device, cache_from=work / "first"
    )
    results["cache, second run"] = run("cache, second run", cfg, second, work / "runs" / "second")

    cached = results["cache, first run"]
    print(f"\nlater-round ÷ first-round time, head mode, cache on: {ratio(cached):.3f} (goal ≤ 0.2)")
    if "no cache" in results:
        off = results["no cache"]
        if len(off) > 2:
            print(f"later-round ÷ first-round time, no cache:           {ratio(off):.3f}")
        # without the cache every training round costs the same: the whole run is round 0 and
        # `--rounds` rounds of the baseline's mean (measured over `--baseline-rounds` of them)
        off_round = statistics.mean(off[1:])
        off_run = off[0] + args.rounds * off_round
        print(f"a later round, cache on ÷ a round without it: {statistics.mean(cached[2:]) / off_round:.3f}")
        print(
            f"whole run, cache on ÷ off (off: r0 + {args.rounds} × its mean round = {off_run:.0f} s): "
            f"first run {sum(cached) / off_run:.3f}, "
            f"second run {sum(results['cache, second run']) / off_run:.3f}"
        )
    second_rounds = results["cache, second run"]
    print(f"second run, round 1 ÷ first run's round 1: {second_rounds[1] / cached[1]:.3f}")
    size = sum(f.stat().st_size for f in (work / "first").rglob("feature-cache/*/*.safetensors"))
    print(f"feature cache on disk after the first run: {size / 2**20:.1f} MiB for {args.merchants} merchants")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
