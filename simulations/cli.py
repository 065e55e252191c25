"""The simulation's commands: `fedbehavior simulate` and `fedbehavior split-store`.

Importing this module imports argparse-level modules only; each command imports what it needs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_simulate(args: argparse.Namespace) -> int:
    from shared.cli import quiet_libraries

    quiet_libraries()
    from shared.config import parse_sets
    from simulations.run import simulate

    overrides: dict[str, Any] = {"runs-dir": args.runs_dir}
    if args.rounds is not None:
        overrides["num-rounds"] = args.rounds
    for key in ("min-train-nodes", "min-evaluate-nodes", "min-available-nodes"):
        overrides[key] = args.merchants  # every simulated merchant takes part
    if args.name:
        overrides["run-name"] = args.name
    overrides.update(parse_sets(args.set))
    run_dir = simulate(overrides, merchants=args.merchants, ray_address=args.ray_address or None)
    print(f"\nrun folder: {run_dir}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from simulations.split import split_store

    folders = split_store(Path(args.ingested), Path(args.out), merchants=args.merchants, by=args.by)
    print(
        f"{len(folders)} merchants in {args.out}; simulate them with: "
        f"fedbehavior simulate --merchants {len(folders)} --set sim-root={Path(args.out).resolve()}"
    )
    return 0


def register(sub: Any) -> None:
    """Add `simulate` and `split-store` to the top-level subparsers."""
    sim = sub.add_parser("simulate", help="run a local simulation of several merchants")
    sim.add_argument("--merchants", type=int, default=4, help="simulated merchants, all in every round")
    sim.add_argument(
        "--rounds", type=int, default=None, help="training rounds (default: the run config's num-rounds)"
    )
    sim.add_argument("--name", default="", help="run name (default: run-<time>-sim)")
    sim.add_argument("--runs-dir", default="runs", help="folder of run folders")
    sim.add_argument(
        "--ray-address",
        default="",
        help="run the merchants on an existing Ray cluster (`auto`, or the head's host:port from "
        "`ray start --head`); default: a private Ray instance on this machine",
    )
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config key of [tool.flwr.app.config], e.g. --set task=next-behavior",
    )
    sim.set_defaults(func=cmd_simulate)

    split = sub.add_parser("split-store", help="split an ingested dataset into simulated merchants")
    split.add_argument("ingested", help="folder written by fedbehavior merchant ingest")
    split.add_argument("out", help="folder for merchant-<i>/ sub-folders")
    split.add_argument("--merchants", type=int, default=4, help="how many merchants to make")
    split.add_argument("--by", default="customer_id", help="column whose values decide the merchant")
    split.set_defaults(func=cmd_split)
