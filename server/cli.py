"""The coordinator's commands: `fedbehavior coordinator …` (start the SuperLink, register merchants,
launch and follow runs), `fedbehavior export` and `fedbehavior report`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _home(args: argparse.Namespace, **flags: Any) -> Any:
    from server.deploy import CoordinatorHome

    return CoordinatorHome.open(Path(args.home) if args.home else None, **flags)


def cmd_dev_certs(args: argparse.Namespace) -> int:
    from shared.pki import make_dev_certificates

    home = _home(args)
    out = Path(args.out) if args.out else home.folder / "certs"
    # the coordinator's own CLI dials 127.0.0.1: the certificate must name it too
    hosts = list(dict.fromkeys([*args.host, "localhost", "127.0.0.1"]))
    certs = make_dev_certificates(out, hosts)
    print("DEVELOPMENT ONLY: a throw-away CA. Production coordinators use their organisation's CA.")
    print(f"  CA certificate (give to every merchant): {certs.ca_cert}")
    print(f"  SuperLink certificate and key:           {certs.server_cert}, {certs.server_key} (0600)")
    print(f"  CA key (keep it off shared machines):    {certs.ca_key} (0600)")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    home = _home(args)
    content = build_fab_from_disk(home.app)  # the same bytes `flwr run` builds from this folder
    digest = hashlib.sha256(content).hexdigest()
    out = Path(args.out) if args.out else Path.cwd() / f"fedbehavior.{digest[:8]}.fab"
    out.write_bytes(content)
    print(f"app {home.app} → {out} ({len(content)} bytes)")
    print(f"  sha256 {digest}")
    print("  give this file to every merchant; each reviews it and runs:")
    print(f"  fedbehavior merchant trust {out.name} --merchant-dir <merchant folder>")
    print("  runs are refused by any merchant that has not approved exactly these bytes")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    home = _home(args, insecure=True if args.insecure else None, port=args.port, host=args.host)
    if home.settings.insecure and not args.insecure:
        raise RuntimeError(
            "insecure = true in the settings, but insecure operation needs the explicit flag as well: "
            "run `fedbehavior coordinator start --insecure` (development only), or remove it from "
            f"{home.folder / 'coordinator.toml'} / FEDBEHAVIOR_COORDINATOR_INSECURE"
        )
    if args.foreground:
        if home.settings.insecure:
            from server.deploy import INSECURE_WARNING

            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        cmd = home.superlink_command()
        home.write_flwr_config()
        os.execve(cmd[0], cmd, {**os.environ, **home.env()})
    pid = home.start()
    s = home.settings
    mode = (
        "INSECURE (no TLS, no authentication)"
        if s.insecure
        else "TLS" + (" + merchant authentication" if s.supernode_auth else "")
    )
    print(f"SuperLink running (pid {pid}) on {s.host}:{s.port}, {mode}; log: {home.superlink.log_file}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    answer = _home(args).register(Path(args.public_key), name=args.name)
    print(f"registered merchant key {args.public_key} as node {answer.get('node-id')}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from server.deploy import run_summary
    from shared.config import parse_sets

    home = _home(args)
    launch = home.launch(parse_sets(args.set), name=args.name, resume=args.resume)
    verb = "resumed" if args.resume else "submitted"
    print(f"run {launch.name} {verb} (flower run {launch.run_id}); folder: {launch.run_dir}")
    if not args.wait:
        print("follow it with: fedbehavior coordinator status")
        return 0
    status = home.wait(launch, timeout=args.timeout)
    print(json.dumps(run_summary(launch.run_dir), indent=2))
    print(f"flower status: {status}")
    return 0 if status == "finished:completed" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from server.deploy import run_summary

    home = _home(args)
    pid = home.superlink.pid()
    report: dict[str, Any] = {"superlink": {"pid": pid, "address": home.settings.dial_address}}
    if pid is not None or home.settings.address:
        report["merchants"] = home.merchants()
        report["flower_runs"] = home.flower_runs()
    runs = sorted((p for p in home.runs.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    report["runs"] = [run_summary(p) for p in runs[-args.last :]]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"SuperLink: {'running, pid ' + str(pid) if pid else 'not running'} ({home.settings.dial_address})")
    for node in report.get("merchants", []):
        print(f"  node {node.get('node-id')}: {node.get('status')}")
    by_name = {}
    for run in report.get("flower_runs", []):
        by_name[int(run.get("run-id", -1))] = run.get("status")
    for run in report["runs"]:
        flower = [by_name.get(i, "?") for i in home.run_ids(run["run"])]
        print(
            f"run {run['run']}: round {run['round']} of {run['planned_rounds']}"
            f"{' (final/ exported)' if run['final'] else ''}; flower: {', '.join(map(str, flower)) or '-'}"
        )
        for merchant, m in sorted(run["merchants"].items()):
            eps = f"{m['epsilon']:.3f}" if isinstance(m.get("epsilon"), (int, float)) else "-"
            print(f"    {merchant:<20} {m['status']:<9} round {m['round']}  ε = {eps}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.run:
        stopped = home.stop_run(args.run)
        print(f"stop requested for flower runs {stopped or 'none (already finished)'} of {args.run}")
        return 0
    print("SuperLink stopped" if home.stop() else "SuperLink was not running")
    return 0


def add_coordinator_cli(sub: Any) -> None:
    coord = sub.add_parser("coordinator", help="run the coordinator (Flower SuperLink) and launch runs")
    coord.add_argument(
        "--home", default="", help="coordinator folder (default $FEDBEHAVIOR_HOME or ~/.fedbehavior)"
    )
    csub = coord.add_subparsers(dest="coordinator_command", required=True)

    certs = csub.add_parser("dev-certs", help="DEVELOPMENT ONLY: a CA and SuperLink certificate")
    certs.add_argument("--host", action="append", default=[], help="name or IP merchants dial (repeatable)")
    certs.add_argument("--out", default="", help="folder (default <home>/certs)")
    certs.set_defaults(func=cmd_dev_certs)

    build = csub.add_parser("build", help="pack the app runs submit into a .fab for merchants to approve")
    build.add_argument("--out", default="", help="file to write (default ./fedbehavior.<hash>.fab)")
    build.set_defaults(func=cmd_build)

    start = csub.add_parser("start", help="start the SuperLink (TLS + merchant authentication)")
    start.add_argument("--insecure", action="store_true", help="plaintext, unauthenticated: development only")
    start.add_argument("--host", default=None, help="interface to listen on (default 0.0.0.0)")
    start.add_argument("--port", type=int, default=None, help="port (default 8000)")
    start.add_argument("--foreground", action="store_true", help="run in this process (systemd, containers)")
    start.set_defaults(func=cmd_start)

    reg = csub.add_parser("register", help="allow a merchant's public key (keys/supernode.pub) to connect")
    reg.add_argument("public_key")
    reg.add_argument("--name", default="", help="a label for the merchant")
    reg.set_defaults(func=cmd_register)

    run = csub.add_parser("run", help="launch a training run on the connected merchants")
    run.add_argument("--name", default="", help="run name (default run-<time>)")
    run.add_argument("--resume", default="", metavar="RUN", help="continue RUN from its last checkpoint")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    run.add_argument("--wait", action="store_true", help="block until the run ends; exit 1 if it failed")
    run.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits")
    run.set_defaults(func=cmd_run)

    status = csub.add_parser("status", help="merchants, runs, rounds, each merchant's status and epsilon")
    status.add_argument("--json", action="store_true")
    status.add_argument("--last", type=int, default=5, help="how many recent runs to show")
    status.set_defaults(func=cmd_status)

    stop = csub.add_parser("stop", help="stop the SuperLink (or, with --run, one run)")
    stop.add_argument("--run", default="", help="stop this run only")
    stop.set_defaults(func=cmd_stop)


def register(sub: Any) -> None:
    """Add the coordinator's commands to the top-level subparsers: `coordinator`, `export`, `report`."""
    from server.hf_export import add_export_cli
    from server.report import add_report_cli

    add_coordinator_cli(sub)
    add_export_cli(sub)
    add_report_cli(sub)
