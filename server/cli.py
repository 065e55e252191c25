"""The coordinator's commands: `fedbehavior coordinator …` (start the SuperLink, register merchants,
launch runs, list them and read their rounds, export and report). `fedbehavior export` and
`fedbehavior report` are kept as the older spellings of `coordinator export` and `coordinator report`.

`--home DIR` (the coordinator's folder) goes before or after the subcommand: `coordinator --home DIR
start` and `coordinator start --home DIR` are the same. Importing this module imports argparse-level
modules only: every command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def _home(args: argparse.Namespace, **flags: Any) -> Any:
    from server.deploy import CoordinatorHome

    home = getattr(args, "home", "")
    return CoordinatorHome.open(Path(home) if home else None, **flags)


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
    print(f"  fedbehavior merchant trust <merchant folder> {out.name}")
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
        where = f" --home {home.folder}" if _home_arg(args) else ""
        print(f"follow it with: fedbehavior coordinator log {launch.name}{where} --follow")
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


def cmd_runs(args: argparse.Namespace) -> int:
    """List the run folders: name, start, status, rounds, last metrics."""
    from server.runs import list_runs, runs_folder, runs_table

    folder = Path(args.runs_dir).expanduser().resolve() if args.runs_dir else runs_folder(_home_arg(args))
    runs = list_runs(folder)
    if args.last:
        runs = runs[-args.last :]
    if args.json:
        print(json.dumps([r.to_json() for r in runs], indent=2, ensure_ascii=False))
        return 0
    if not runs:
        print(f"no runs in {folder}")
        return 0
    print("\n".join(runs_table(runs)))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    """A run's rounds (the console table or the JSON rows); with --follow, new rounds as they come."""
    from server.runs import follow, print_log, resolve_run

    run_dir = resolve_run(args.run, _home_arg(args))
    if not args.follow:
        print_log(run_dir, sys.stdout, as_json=args.json)
        return 0
    try:
        for _ in follow(run_dir, sys.stdout, as_json=args.json, interval=args.interval):
            pass
    except KeyboardInterrupt:
        pass
    return 0


def _home_arg(args: argparse.Namespace) -> str:
    return str(getattr(args, "home", "") or "")


def _run_dir_of(args: argparse.Namespace) -> None:
    """`RUN` of export and report: a run folder, or a run's name in the coordinator's runs folder."""
    from server.runs import resolve_run

    with contextlib.suppress(FileNotFoundError):  # the command names the missing folder itself
        args.run_dir = str(resolve_run(args.run_dir, _home_arg(args)))


def cmd_export(args: argparse.Namespace) -> int:
    from server.hf_export import cmd_export as export

    _run_dir_of(args)
    return int(export(args))


def cmd_report(args: argparse.Namespace) -> int:
    from server.report import cmd_report as report

    _run_dir_of(args)
    return int(report(args))


TENSORBOARD_HELP = (
    "also write TensorBoard scalars to runs/<name>/report/tensorboard/ "
    "(pip install 'fedbehavior[tensorboard]')"
)


def add_run_output_cli(subparsers: Any, *, listed: bool = True, parents: list[Any] | None = None) -> None:
    """`export` and `report` on `subparsers`; `listed=False` keeps them out of `--help` (the old
    top-level spellings `fedbehavior export` / `fedbehavior report`, which keep working)."""
    extra: dict[str, Any] = {"parents": parents or []}
    run_help = "the run folder (runs/<name>)" + (", or a run's name in the runs folder" if listed else "")
    export = subparsers.add_parser(
        "export",
        **({"help": "export a run's model for plain transformers, with a DP model card"} if listed else {}),
        description="Export a run's final/ model for plain transformers (merged, or the PEFT adapter), "
        "with a model card and privacy.json.",
        **extra,
    )
    export.add_argument("run_dir", metavar="RUN", help=run_help)
    export.add_argument("--out", required=True, help="new or empty folder for the export")
    export.add_argument(
        "--adapter-only", action="store_true", help="keep the PEFT adapter folder instead of merging"
    )
    export.set_defaults(func=cmd_export)

    report = subparsers.add_parser(
        "report",
        **({"help": "plots and an HTML page of a run (runs/<name>/report/)"} if listed else {}),
        description="Plots and an HTML page of a run, written to runs/<name>/report/.",
        **extra,
    )
    report.add_argument("run_dir", metavar="RUN", help=run_help)
    report.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    report.set_defaults(func=cmd_report)


def home_parser() -> argparse.ArgumentParser:
    """`--home`, given to the `coordinator` group and to each of its commands: it may stand before or
    after the subcommand (SUPPRESS: a command's parser leaves the group's value alone when not given)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="coordinator folder (default: $FEDBEHAVIOR_HOME or ~/.fedbehavior)",
    )
    return common


def add_coordinator_cli(sub: Any) -> None:
    common = home_parser()
    coord = sub.add_parser(
        "coordinator",
        parents=[common],
        help="the coordinator: the SuperLink, merchants, runs, their logs, exports and reports",
        description="The coordinator's commands. --home DIR may stand before or after the command.",
    )
    csub = coord.add_subparsers(dest="coordinator_command", required=True, metavar="COMMAND")

    def command(name: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = csub.add_parser(name, help=text, parents=[common], **kwargs)
        return parser

    certs = command("dev-certs", "DEVELOPMENT ONLY: a CA and SuperLink certificate")
    certs.add_argument("--host", action="append", default=[], help="name or IP merchants dial (repeatable)")
    certs.add_argument("--out", default="", help="folder (default <home>/certs)")
    certs.set_defaults(func=cmd_dev_certs)

    build = command("build", "pack the app runs submit into a .fab for merchants to approve")
    build.add_argument("--out", default="", help="file to write (default ./fedbehavior.<hash>.fab)")
    build.set_defaults(func=cmd_build)

    start = command("start", "start the SuperLink (TLS + merchant authentication)")
    start.add_argument("--insecure", action="store_true", help="plaintext, unauthenticated: development only")
    start.add_argument(
        "--host",
        default=None,
        help="interface to listen on (default: host in coordinator.toml, else 0.0.0.0)",
    )
    start.add_argument(
        "--port", type=int, default=None, help="port (default: port in coordinator.toml, else 8000)"
    )
    start.add_argument("--foreground", action="store_true", help="run in this process (systemd, containers)")
    start.set_defaults(func=cmd_start)

    reg = command("register", "allow a merchant's public key (keys/supernode.pub) to connect")
    reg.add_argument("public_key", help="the merchant's keys/supernode.pub")
    reg.add_argument("--name", default="", help="a label for the merchant")
    reg.set_defaults(func=cmd_register)

    run = command("run", "launch a training run on the connected merchants")
    run.add_argument("--name", default="", help="run name (default run-<time>)")
    run.add_argument("--resume", default="", metavar="RUN", help="continue RUN from its last checkpoint")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    run.add_argument("--wait", action="store_true", help="block until the run ends; exit 1 if it failed")
    run.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits")
    run.set_defaults(func=cmd_run)

    status = command("status", "the SuperLink, merchants, runs, rounds, each merchant's status and ε")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--last", type=int, default=5, help="how many recent runs to show")
    status.set_defaults(func=cmd_status)

    runs = command(
        "runs",
        "list the runs: name, start, status, rounds done, last metrics (from the run folders)",
        description="List the run folders of the coordinator's runs folder (or --runs-dir): each run's "
        "name, start, status, rounds done of those planned, largest ε and last pooled metrics "
        "(± the DP noise's standard deviation). Reads the folders only; `coordinator status` asks "
        "the SuperLink. Status: failed (failure.json), finished (final/), unfinished (rounds written: "
        "running, or stopped), submitted (launched, no round yet).",
    )
    runs.add_argument(
        "--runs-dir", default="", metavar="DIR", help="list this folder instead (e.g. a simulation's runs/)"
    )
    runs.add_argument("--last", type=int, default=0, help="only the latest N runs (0: all)")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    runs.set_defaults(func=cmd_runs)

    log = command(
        "log",
        "a run's rounds (metrics.jsonl as the console table), and how it ended",
        description="Print a run's rounds from its metrics.jsonl, as the coordinator's console showed "
        "them, then how it ended (failure.json's reason, or final/). RUN is a run's name in the runs "
        "folder or a run folder's path (a simulation's runs/<name> too).",
    )
    log.add_argument("run", metavar="RUN", help="a run's name, or a run folder")
    log.add_argument("--follow", "-f", action="store_true", help="keep printing rounds until the run ends")
    log.add_argument("--interval", type=float, default=2.0, help="seconds between looks with --follow")
    log.add_argument("--json", action="store_true", help="the rows as JSON lines")
    log.set_defaults(func=cmd_log)

    stop = command("stop", "stop the SuperLink (or, with --run, one run)")
    stop.add_argument("--run", default="", help="stop this run only")
    stop.set_defaults(func=cmd_stop)

    add_run_output_cli(csub, parents=[common])


def register(sub: Any) -> None:
    """Add the coordinator's commands to the top-level subparsers: the `coordinator` group; `export`
    and `report` also at the top, unlisted, as they were first spelled."""
    add_coordinator_cli(sub)
    add_run_output_cli(sub, listed=False)
