"""`fedbehavior` command line: simulate, merchant tools. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.config import parse_sets


def _quiet_libraries() -> None:
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }.items():
        os.environ.setdefault(key, value)
    import transformers

    transformers.logging.set_verbosity_error()


def cmd_simulate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from simulations.run import simulate

    overrides: dict[str, Any] = {"num-rounds": args.rounds, "runs-dir": args.runs_dir}
    for key in ("min-train-nodes", "min-evaluate-nodes", "min-available-nodes"):
        overrides[key] = args.merchants  # every simulated merchant takes part
    if args.name:
        overrides["run-name"] = args.name
    overrides.update(parse_sets(args.set))
    run_dir = simulate(overrides, merchants=args.merchants)
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


def cmd_budget(args: argparse.Namespace) -> int:
    from shared.privacy.accounting import Charge, epsilon_of

    path = Path(args.ledger)
    if (path / "merchant.toml").exists():
        from client.settings import MerchantSettings

        path = MerchantSettings.from_merchant_dir(path).ledger_path
    if path.is_dir():
        path = (
            path / "privacy-ledger.json"
            if (path / "privacy-ledger.json").exists()
            else path / "state" / "privacy-ledger.json"
        )
    if not path.exists():
        print(f"no ledger at {path}: this merchant has not trained yet (ε = 0)")
        return 0
    data = json.loads(path.read_text(encoding="utf-8"))
    history = [Charge.from_json(h) for h in data["history"]]
    eps = epsilon_of(history, float(data["delta"]), accountant=str(data.get("accountant", "rdp")))
    print(
        f"merchant {data['merchant_id']}: ε = {eps:.3f} of max {data['max_epsilon']} at δ = {data['delta']} "
        f"({data['accountant']} accountant, privacy unit: {data['privacy_unit']})"
    )
    print(f"{'run':<36} {'round':>5} {'σ':>7} {'q':>8} {'steps':>6} {'clip':>5}")
    for h in history:
        print(
            f"{h.run_id:<36} {h.round:>5} {h.noise_multiplier:>7.3f} {h.sample_rate:>8.4f} {h.steps:>6} "
            f"{h.max_grad_norm:>5}"
        )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from client.data import load_events
    from client.settings import MerchantSettings

    settings = MerchantSettings.from_merchant_dir(Path(args.merchant_dir))
    _, report = load_events(settings.data_dir, settings.state_dir)
    print(f"{report.total} rows: {report.good} good, {report.quarantined} quarantined")
    for reason, count in sorted(report.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {count:>7}  {reason}")
    return 0 if report.quarantined == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedbehavior", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a local simulation of several merchants")
    sim.add_argument("--merchants", type=int, default=4)
    sim.add_argument("--rounds", type=int, default=3)
    sim.add_argument("--name", default="", help="run name (default: run-<time>-sim)")
    sim.add_argument("--runs-dir", default="runs")
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
    split.add_argument("--merchants", type=int, default=4)
    split.add_argument("--by", default="customer_id", help="column whose values decide the merchant")
    split.set_defaults(func=cmd_split)

    merchant = sub.add_parser("merchant", help="merchant tools").add_subparsers(
        dest="merchant_command", required=True
    )
    budget = merchant.add_parser("budget", help="show a privacy ledger")
    budget.add_argument("ledger", help="ledger file, state folder or merchant folder")
    budget.set_defaults(func=cmd_budget)
    validate = merchant.add_parser("validate-data", help="validate events.jsonl and quarantine bad rows")
    validate.add_argument("merchant_dir")
    validate.set_defaults(func=cmd_validate)
    from client.cli import add_merchant_daemon_cli
    from client.ingest.cli import add_ingest_cli
    from client.preview import add_preview_cli
    from server.cli import add_coordinator_cli

    add_ingest_cli(merchant)
    add_preview_cli(merchant)
    add_merchant_daemon_cli(merchant)
    add_coordinator_cli(sub)
    from client.predict import add_predict_cli
    from server.hf_export import add_export_cli
    from server.report import add_report_cli

    add_predict_cli(sub)
    add_export_cli(sub)
    add_report_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for noisy in ("flwr", "ray", "opacus", "transformers", "peft", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except (ValueError, OSError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
