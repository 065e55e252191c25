"""The merchant's commands: `fedbehavior merchant …` (ingest, preview, validate-data, budget and the
daemon: init, trust, start, stop; personalize), `fedbehavior predict` and `fedbehavior serve`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def cmd_init(args: argparse.Namespace) -> int:
    from client.daemon import init_merchant

    settings = init_merchant(
        Path(args.merchant_dir),
        merchant_id=args.merchant_id,
        superlink=args.superlink,
        root_certificates=Path(args.root_certificates) if args.root_certificates else None,
        max_epsilon=args.max_epsilon,
        delta=args.delta,
        insecure=args.insecure,
        runtime_port=args.runtime_port,
    )
    folder = Path(args.merchant_dir).resolve()
    print(f"merchant {settings.merchant_id} set up in {folder}: settings in {folder / 'merchant.toml'}")
    if settings.daemon.private_key is not None and not settings.daemon.insecure:
        print(f"  private key (never share it, mode 0600): {settings.daemon.private_key}")
        print(f"  send this public key to the coordinator:   {settings.daemon.private_key}.pub")
    print(f"  put events.jsonl (or an ingested store/) in {settings.data_dir}")
    print(f"  once the coordinator has registered your key: fedbehavior merchant start {folder}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from client.daemon import INSECURE_WARNING, Merchant

    merchant = Merchant.open(Path(args.merchant_dir))
    if merchant.settings.daemon.insecure and not args.insecure:
        raise RuntimeError(
            f"{merchant.folder / 'merchant.toml'} says insecure = true: confirm with "
            f"`fedbehavior merchant start {merchant.folder} --insecure` (development only), or set it to "
            "false and give root-certificates and private-key"
        )
    spent = budget_warning(merchant.settings)
    if spent:
        print(spent, file=sys.stderr, flush=True)
    if args.foreground:
        if merchant.settings.daemon.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        cmd = merchant.supernode_command()
        os.execve(cmd[0], cmd, {**os.environ, **merchant.env()})
    pid = merchant.start()
    print(
        f"merchant {merchant.settings.merchant_id}: SuperNode running (pid {pid}), dialling "
        f"{merchant.settings.daemon.superlink}; log: {merchant.supernode.log_file}"
    )
    return 0


def budget_warning(settings: Any) -> str:
    """A warning when the merchant's lifetime budget cannot pay for one more evaluation (so no run can
    use its data), else ''. Reads the ledger only."""
    from shared.privacy import Charge

    if not settings.ledger_path.exists():
        return ""
    ledger = settings.open_ledger()
    # the cheapest release a run makes: one evaluation, a Gaussian mechanism at σ with sensitivity 1
    cheapest = Charge(0, "next", settings.eval_noise_multiplier, 1.0, 1, 1.0)
    if ledger.epsilon_after(cheapest) <= ledger.max_epsilon:
        return ""
    return (
        f"warning: merchant {settings.merchant_id} has spent its privacy budget (ε {ledger.epsilon:.3f} of "
        f"max-epsilon {ledger.max_epsilon:g}): it will refuse every run, since not even one evaluation "
        "fits. Raising max-epsilon weakens the promise made to your customers; decide it deliberately."
    )


def _ask(question: str) -> str:
    try:
        return input(question).strip().lower()
    except EOFError:  # no terminal (a script): nothing was approved
        return ""


def cmd_trust(args: argparse.Namespace) -> int:
    from client.trust import AppBundle, TrustStore

    folder = Path(args.merchant_dir).expanduser().resolve()
    store = TrustStore(folder)
    if args.list or args.revoke:
        if args.revoke:
            gone = store.revoke(args.revoke)
            print(f"revoked {len(gone)} approval(s)" + "".join(f"\n  {a.sha256}  {a.app}" for a in gone))
        for a in store.approvals():
            print(f"{a.sha256}  {a.app}  {a.files} files  approved {a.approved_at} from {a.source}")
        return 0
    if not args.app:
        raise ValueError("give the app to approve (a folder or a .fab file), or --list / --revoke HASH")
    if not (folder / "merchant.toml").exists():
        raise FileNotFoundError(f"no merchant.toml in {folder}: pass --merchant-dir <your merchant folder>")
    bundle = AppBundle.load(Path(args.app))
    print(bundle.describe())
    print(
        "Approving lets every run that brings exactly these bytes execute them next to your data; "
        "the ledger, budget and outgoing guard that protect it are part of them."
    )
    if not args.yes and _ask("Approve this app? [y/N] ") not in ("y", "yes"):
        print("not approved")
        return 1
    approval = store.approve(bundle)
    print(f"approved {approval.app} (sha256 {approval.sha256}) in {store.approvals_path}")
    print("a running SuperNode checks approvals for every new run: no restart needed")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from client.daemon import Merchant

    merchant = Merchant.open(Path(args.merchant_dir))
    print("SuperNode stopped" if merchant.stop() else "SuperNode was not running")
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    """Show a merchant's privacy ledger: its epsilon now and every charge."""
    import json

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
    _print_runs(path.parent)
    return 0


def _print_runs(state_dir: Path) -> None:
    """The merchant's run book beside its ledger: the runs it joined and what each was answered."""
    from datetime import datetime, timezone

    from client.budget import RUNS_FILE, RunBook

    if not (state_dir / RUNS_FILE).exists():
        return
    print(f"\n{'run record':<36} {'started (UTC)':<17} {'trained':>8} {'evals':>5} {'size':>8}")
    for r in RunBook.load(state_dir).records:
        started = datetime.fromtimestamp(r.started, timezone.utc).strftime("%Y-%m-%d %H:%M")
        size = "-" if r.size is None else f"{r.size}{'~' if r.size_estimated else ''}"
        print(f"{r.record_id:<36} {started:<17} {len(r.trained):>8} {r.evaluations:>5} {size:>8}")
    print("(size: the run's public training size; ~ a charged estimate)")


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a merchant's events, quarantining bad rows; exit 1 when any row was quarantined."""
    from client.data import load_events
    from client.settings import MerchantSettings

    settings = MerchantSettings.from_merchant_dir(Path(args.merchant_dir))
    _, report = load_events(settings.data_dir, settings.state_dir)
    print(f"{report.total} rows: {report.good} good, {report.quarantined} quarantined")
    for reason, count in sorted(report.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {count:>7}  {reason}")
    return 0 if report.quarantined == 0 else 1


def add_merchant_daemon_cli(merchant: Any) -> None:
    init = merchant.add_parser("init", help="create merchant.toml and an authentication key pair")
    init.add_argument("merchant_dir")
    init.add_argument("--merchant-id", required=True)
    init.add_argument("--superlink", required=True, help="coordinator address host:port")
    init.add_argument("--root-certificates", default="", help="the coordinator's CA certificate (ca.crt)")
    init.add_argument("--max-epsilon", type=float, default=8.0, help="your privacy budget (default 8)")
    init.add_argument("--delta", type=float, default=1e-6)
    init.add_argument(
        "--runtime-port", type=int, default=9094, help="local port, unique per merchant on a host"
    )
    init.add_argument("--insecure", action="store_true", help="no TLS, no key: development only")
    init.set_defaults(func=cmd_init)

    trust = merchant.add_parser(
        "trust", help="review a Flower app (folder or .fab) and approve it: only approved apps run here"
    )
    trust.add_argument("app", nargs="?", default="", help="the app folder or .fab the coordinator runs")
    trust.add_argument("--merchant-dir", default=".", help="your merchant folder (default: here)")
    trust.add_argument("--yes", action="store_true", help="approve without asking (after reviewing)")
    trust.add_argument("--list", action="store_true", help="list the approved apps")
    trust.add_argument("--revoke", default="", metavar="SHA256", help="withdraw an approval (hash prefix)")
    trust.set_defaults(func=cmd_trust)

    start = merchant.add_parser("start", help="start this merchant's daemon (Flower SuperNode)")
    start.add_argument("merchant_dir")
    start.add_argument("--foreground", action="store_true", help="run in this process (systemd, containers)")
    start.add_argument(
        "--insecure", action="store_true", help="confirm plaintext operation (development only)"
    )
    start.set_defaults(func=cmd_start)

    stop = merchant.add_parser("stop", help="stop this merchant's daemon")
    stop.add_argument("merchant_dir")
    stop.set_defaults(func=cmd_stop)


def register(sub: Any) -> None:
    """Add the merchant's commands to the top-level subparsers: the `merchant` group (ingest, preview,
    validate-data, budget, init, trust, start, stop, personalize), `predict` and `serve`."""
    from client.ingest.cli import add_ingest_cli
    from client.personalize import add_personalize_cli
    from client.predict import add_predict_cli
    from client.preview import add_preview_cli
    from client.serving.cli import add_serve_cli

    merchant = sub.add_parser("merchant", help="merchant tools").add_subparsers(
        dest="merchant_command", required=True
    )
    add_ingest_cli(merchant)
    add_preview_cli(merchant)
    validate = merchant.add_parser("validate-data", help="validate events.jsonl and quarantine bad rows")
    validate.add_argument("merchant_dir")
    validate.set_defaults(func=cmd_validate)
    budget = merchant.add_parser("budget", help="show a privacy ledger")
    budget.add_argument("ledger", help="ledger file, state folder or merchant folder")
    budget.set_defaults(func=cmd_budget)
    add_merchant_daemon_cli(merchant)
    add_personalize_cli(merchant)
    add_predict_cli(sub)
    add_serve_cli(sub)
