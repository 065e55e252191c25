"""The merchant's commands: `fedbehavior merchant …` (ingest, preview, validate-data, budget; the
daemon: init, trust, start, stop; personalise, predict, serve). `fedbehavior predict` and `fedbehavior
serve` are kept as the older spellings of `merchant predict` and `merchant serve`.

Importing this module imports argparse-level modules only: every command imports what it needs when it
runs, so `fedbehavior --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def cmd_init(args: argparse.Namespace) -> int:
    from client.daemon.control import init_merchant

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
    from client.daemon.control import INSECURE_WARNING, Merchant

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


def trust_folders(args: argparse.Namespace) -> tuple[Path, str]:
    """The merchant folder and the app of `merchant trust`.

    `trust MERCHANT_DIR [APP]` like its siblings (init, start, stop); the older spellings keep working:
    `trust APP --merchant-dir DIR` (deprecated) and `trust APP` run inside the merchant folder."""
    given = [p for p in (args.folder, args.app) if p]
    listing = bool(args.list or args.revoke)
    if args.merchant_dir is not None:
        print(
            "warning: --merchant-dir is deprecated; give the folder first, as the other merchant commands "
            "do: fedbehavior merchant trust MERCHANT_DIR [APP]",
            file=sys.stderr,
        )
        if len(given) > 1:
            raise ValueError(f"two merchant folders: {given[0]} and --merchant-dir {args.merchant_dir}")
        return Path(args.merchant_dir), given[0] if given else ""
    if len(given) == 2:
        return Path(given[0]), given[1]
    if len(given) == 1:
        only = Path(given[0]).expanduser()
        if listing or (only / "merchant.toml").exists():
            return only, ""
        return Path("."), given[0]  # `trust APP` inside the merchant folder
    return Path("."), ""


def cmd_trust(args: argparse.Namespace) -> int:
    from client.daemon.trust import AppBundle, TrustStore

    merchant_dir, app = trust_folders(args)
    folder = merchant_dir.expanduser().resolve()
    store = TrustStore(folder)
    if args.list or args.revoke:
        if args.revoke:
            gone = store.revoke(args.revoke)
            print(f"revoked {len(gone)} approval(s)" + "".join(f"\n  {a.sha256}  {a.app}" for a in gone))
        for a in store.approvals():
            print(f"{a.sha256}  {a.app}  {a.files} files  approved {a.approved_at} from {a.source}")
        return 0
    if not app:
        raise ValueError(
            "give the app to approve (a folder or a .fab file): fedbehavior merchant trust MERCHANT_DIR APP, "
            "or --list / --revoke HASH"
        )
    if not (folder / "merchant.toml").exists():
        raise FileNotFoundError(
            f"no merchant.toml in {folder}: fedbehavior merchant trust <your merchant folder> {app}"
        )
    bundle = AppBundle.load(Path(app))
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
    from client.daemon.control import Merchant

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

    from client.training.budget import RUNS_FILE, RunBook

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
    from client.ingest.data import load_events
    from client.settings import MerchantSettings

    settings = MerchantSettings.from_merchant_dir(Path(args.merchant_dir))
    _, report = load_events(settings.data_dir, settings.state_dir)
    print(f"{report.total} rows: {report.good} good, {report.quarantined} quarantined")
    for reason, count in sorted(report.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {count:>7}  {reason}")
    return 0 if report.quarantined == 0 else 1


# ------------------------------------------------------------------------------------------ parsers
# Light on purpose: building them imports no module of a command (those load torch, pyarrow, pydantic
# models); each command's function is imported when it runs (`lazy`). Where a command's module keeps
# its own `add_*_cli`, tests/test_cli_fast.py keeps both parsers' options equal.

INGEST_FORMATS = ("taobao", "retailrocket", "yoochoose", "generic", "csv", "parquet", "jsonl")
"""`client.ingest.formats.FORMATS`, without importing pyarrow (a test keeps them equal)."""

PERSONALISE_TRAIN = ("head", "lora+head")
"""`client.evaluation.personalise.TRAIN_MODES` (a test keeps them, and the defaults below, equal)."""

INGEST_EPILOG = """examples:
  fedbehavior merchant ingest UserBehavior.csv --format taobao --out merchant-1
  fedbehavior merchant ingest events.csv --format retailrocket --categories item_properties_part1.csv --out m2
  fedbehavior merchant ingest yoochoose-data/ --format yoochoose --out m3
  fedbehavior merchant ingest export.csv --format csv --out m4 \\
      --map customer_id=user,timestamp=event_time,behavior=event,item_id=sku \\
      --behavior-map product_view=view,add_to_cart=cart,purchase=buy
  fedbehavior merchant ingest export.csv.gz --format csv --out m5 \\
      --map customer_id=user_id,session_id=session_id,timestamp=timestamp,behavior=event \\
      --behavior-map product_view=view,add_to_cart=cart,shipping_details=cart,purchase=buy \\
      --attribute platform,user_lifecycle

Event names that --behavior-map does not map are kept with role `other` (their own name goes into the
text) and counted in the report; --strict quarantines them instead. CSV and JSON Lines may be .gz,
.bz2 or .zst.
"""


def module_doc(module: str) -> str:
    """A module's docstring, read from its source without running it (its imports are heavy)."""
    import ast
    from importlib.util import find_spec

    spec = find_spec(module)  # imports the parent packages only (docstrings)
    if spec is None or spec.origin is None:
        return ""
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""


def add_ingest_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `ingest` on an argparse subparsers object (the `merchant` command's)."""
    from shared.cli import lazy

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ingest",
        help="ingest a shop export into a validated local Parquet store",
        description="Read a behaviour export (Taobao, RetailRocket, YooChoose or any CSV/Parquet/JSONL), "
        "validate it, quarantine bad rows with their row number and reason, cut sessions, and write "
        "<out>/store/part-*.parquet, <out>/quarantine.parquet and <out>/ingest-report.json. "
        "The source file is only read.",
        epilog=INGEST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", type=Path, help="the export file (YooChoose: the clicks file or its folder)"
    )
    parser.add_argument(
        "--format", "-f", dest="fmt", required=True, choices=INGEST_FORMATS, help="source format"
    )
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="csv/parquet/jsonl: store field <- source column, comma-separated or repeated "
        "(fields: customer_id, session_id, timestamp, behavior, event_name, item_id, title, category, "
        "price, query, review_text, rating, customer_segment, customer_region, customer_age_band)",
    )
    parser.add_argument(
        "--behavior-map",
        action="append",
        default=[],
        metavar="NAME=BEHAVIOR",
        help="the shop's behaviour names, e.g. product_view=view,add_to_cart=cart,purchase=buy",
    )
    parser.add_argument(
        "--attribute",
        action="append",
        default=[],
        metavar="COLUMN[,COLUMN]",
        help="csv/parquet/jsonl: customer or session attribute columns kept for the text (platform, ...)",
    )
    parser.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quarantine event names --behavior-map does not map (default: on for taobao, retailrocket, "
        "yoochoose; off for csv/parquet/jsonl, where they get role `other`)",
    )
    parser.add_argument("--categories", help="retailrocket: itemid,categoryid CSV or item_properties files")
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="the merchant's own labels for task customer-label (CSV: customer_id,label or "
        "customer_id,session_id,label), copied beside the store; rows are checked when training",
    )
    parser.add_argument("--session-gap", type=int, default=1800, metavar="SECONDS", help="inactivity gap")
    parser.add_argument("--batch-rows", type=int, default=1_000_000, help="rows per batch (memory bound)")
    parser.add_argument(
        "--replace-smaller",
        action="store_true",
        help="replace an existing store even when the new export has fewer good rows (default: refuse)",
    )
    parser.set_defaults(func=lazy("client.ingest.cli", "cmd_ingest"))
    return parser


def add_preview_cli(subparsers: Any) -> argparse.ArgumentParser:
    """`merchant preview` (its command, `client.ingest.preview.cmd_preview`, is imported when it runs)."""
    from shared.cli import lazy

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "preview",
        help="show the exact texts and labels the model will see",
        description="Build a task's examples from a merchant's data exactly as training does and print a "
        "few of them (text, label, customer, session). Reads only.",
    )
    parser.add_argument(
        "folder", help="a merchant folder (merchant.toml) or a data folder (store/ or events.jsonl)"
    )
    parser.add_argument("--task", default="purchase-intent", help="task name (as in the run config)")
    parser.add_argument("--limit", type=int, default=5, help="examples per split")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=lazy("client.ingest.preview", "cmd_preview"))
    return parser


def add_personalise_cli(subparsers: Any) -> argparse.ArgumentParser:
    """`merchant personalise` (its command, `client.evaluation.personalise`, imports torch when it runs)."""
    from shared.cli import lazy

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "personalise",
        aliases=["personalize"],
        help="fine-tune the global model on your own customers (local, not DP towards them)",
    )
    parser.add_argument("merchant_dir", help="your merchant folder")
    parser.add_argument(
        "--global",
        dest="global_folder",
        default="",
        help="a run's final/ or an export (default: the global model this merchant kept last)",
    )
    parser.add_argument(
        "--train", choices=PERSONALISE_TRAIN, default="head", help="head alone, or LoRA and head"
    )
    parser.add_argument("--epochs", type=int, default=20, help="at most; early-stopped")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="the head's AdamW rate")
    parser.add_argument("--lora-learning-rate", type=float, default=0.001, help="LoRA's rate")
    parser.add_argument("--batch-size", type=int, default=32, help="customers' examples per step")
    parser.add_argument(
        "--validation-fraction", type=float, default=0.2, help="of the training customers, for early stop"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, auto")
    parser.add_argument("--out", required=True, help="the personalised model folder (final/ format)")
    parser.set_defaults(func=lazy("client.evaluation.personalise", "cmd_personalise"))
    return parser


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `predict` (its command, `client.evaluation.predict`, imports torch when it runs)."""
    from shared.cli import lazy

    parser.add_argument("--model", required=True, help="runs/<name>/final, the run folder, or an export")
    parser.add_argument("--events", required=True, help="an export file, or a merchant data folder")
    parser.add_argument("--out", required=True, help="scores.csv or scores.jsonl")
    parser.add_argument(
        "--format", "-f", dest="fmt", default="generic", choices=INGEST_FORMATS, help="as for ingest"
    )
    parser.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN", help="as for ingest")
    parser.add_argument(
        "--behavior-map", action="append", default=[], metavar="NAME=BEHAVIOR", help="as for ingest"
    )
    parser.add_argument(
        "--attribute", action="append", default=[], metavar="COLUMN[,COLUMN]", help="as for ingest"
    )
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None, help="as for ingest")
    parser.add_argument("--task", default="", help="the run's task, for a final/ without run-config.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other run keys")
    parser.add_argument("--batch-size", type=int, default=256, help="sessions per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    parser.add_argument(
        "--runtime", default="torch", choices=("torch", "onnx", "onnx-int8"),
        help="torch (default); onnx: ONNX Runtime on the CPU, same scores within 1e-4, faster; "
        "onnx-int8: int8 weights, fastest, same ranking but probabilities moved by ~0.04. "
        "Needs pip install 'fedbehavior[onnx]'",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads of the runtime (default 0: the runtime's own)"
    )
    parser.set_defaults(func=lazy("client.evaluation.predict", "cmd_predict"))


def add_scoring_cli(subparsers: Any, *, listed: bool = True) -> None:
    """`predict` and `serve` on `subparsers`; `listed=False` keeps them out of `--help` (the old
    top-level spellings `fedbehavior predict` / `fedbehavior serve`, which keep working)."""
    from client.serving import cli as serving  # argparse-level at import: the server loads in cmd_serve

    texts = {
        "predict": "score sessions or customers with a trained model (a file of scores)",
        "serve": "real-time scoring over gRPC (fedbehavior.v1.Scorer)",
    }
    help_of = (lambda name: {"help": texts[name]}) if listed else (lambda name: {})
    predict = subparsers.add_parser(
        "predict", description=module_doc("client.evaluation.predict"),
        formatter_class=argparse.RawDescriptionHelpFormatter, **help_of("predict"),
    )  # fmt: skip
    add_predict_arguments(predict)
    serve = subparsers.add_parser(
        "serve", description=serving.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        **help_of("serve"),
    )  # fmt: skip
    serving.add_serve_arguments(serve)


def add_merchant_daemon_cli(merchant: Any) -> None:
    init = merchant.add_parser("init", help="create merchant.toml and an authentication key pair")
    init.add_argument("merchant_dir", help="the merchant folder to create")
    init.add_argument("--merchant-id", required=True, help="your name in runs and ledgers")
    init.add_argument("--superlink", required=True, help="coordinator address host:port")
    init.add_argument("--root-certificates", default="", help="the coordinator's CA certificate (ca.crt)")
    init.add_argument("--max-epsilon", type=float, default=8.0, help="your lifetime privacy budget")
    init.add_argument("--delta", type=float, default=1e-6, help="δ of your (ε, δ) promise")
    init.add_argument(
        "--runtime-port", type=int, default=9094, help="local port, unique per merchant on a host"
    )
    init.add_argument("--insecure", action="store_true", help="no TLS, no key: development only")
    init.set_defaults(func=cmd_init)

    trust = merchant.add_parser(
        "trust",
        help="review a Flower app (folder or .fab) and approve it: only approved apps run here",
        description="Review and approve the app the coordinator runs, or list / revoke approvals: "
        "`fedbehavior merchant trust MERCHANT_DIR APP`, `... trust MERCHANT_DIR --list`. "
        "The older `trust APP --merchant-dir DIR` still works.",
    )
    trust.add_argument("folder", nargs="?", default="", metavar="MERCHANT_DIR", help="your merchant folder")
    trust.add_argument("app", nargs="?", default="", help="the app folder or .fab the coordinator runs")
    trust.add_argument("--merchant-dir", default=None, help=argparse.SUPPRESS)  # deprecated: the folder
    trust.add_argument("--yes", action="store_true", help="approve without asking (after reviewing)")
    trust.add_argument("--list", action="store_true", help="list the approved apps")
    trust.add_argument("--revoke", default="", metavar="SHA256", help="withdraw an approval (hash prefix)")
    trust.set_defaults(func=cmd_trust)

    start = merchant.add_parser("start", help="start this merchant's daemon (Flower SuperNode)")
    start.add_argument("merchant_dir", help="your merchant folder")
    start.add_argument("--foreground", action="store_true", help="run in this process (systemd, containers)")
    start.add_argument(
        "--insecure", action="store_true", help="confirm plaintext operation (development only)"
    )
    start.set_defaults(func=cmd_start)

    stop = merchant.add_parser("stop", help="stop this merchant's daemon")
    stop.add_argument("merchant_dir", help="your merchant folder")
    stop.set_defaults(func=cmd_stop)


def register(sub: Any) -> None:
    """Add the merchant's commands to the top-level subparsers: the `merchant` group (ingest, preview,
    validate-data, budget, init, trust, start, stop, personalise, predict, serve); `predict` and `serve`
    also at the top, unlisted, as they were first spelled."""
    merchant = sub.add_parser(
        "merchant",
        help="the merchant's tools: data, privacy budget, the daemon, personalise, predict, serve",
        description="The merchant's commands. Those that act on a merchant folder take it first: "
        "fedbehavior merchant COMMAND MERCHANT_DIR ...",
    ).add_subparsers(dest="merchant_command", required=True, metavar="COMMAND")
    add_ingest_cli(merchant)
    add_preview_cli(merchant)
    validate = merchant.add_parser(
        "validate-data", help="validate the merchant's data (store/ or events.jsonl) and quarantine bad rows"
    )
    validate.add_argument("merchant_dir", help="your merchant folder")
    validate.set_defaults(func=cmd_validate)
    budget = merchant.add_parser("budget", help="show a privacy ledger")
    budget.add_argument("ledger", help="ledger file, state folder or merchant folder")
    budget.set_defaults(func=cmd_budget)
    add_merchant_daemon_cli(merchant)
    add_personalise_cli(merchant)
    add_scoring_cli(merchant)
    add_scoring_cli(sub, listed=False)
