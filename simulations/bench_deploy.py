"""Deployment overhead: what a message costs a deployed merchant before its ClientApp starts work, and a
deployed round against a simulated round on the same data (issue 22: overhead ≤ 2 s, ratio ≤ 1.3).

    .venv/bin/python -m simulations.bench_deploy [--merchants 2] [--customers 500] [--rounds 3]
                                                 [--backbone ID] [--modes subprocess,warm]
                                                 [--no-simulation] [--out DIR]

Run from the checkout (it reuses `tests/deploy_helpers.py`). Three runs of the same plan (the run
config's defaults, `--rounds` rounds, all merchants in every round) over fresh copies of the same
synthetic merchants (`generate_merchant(7, i)`, as `fedbehavior simulate` makes them):
  - simulated: `simulations.run.simulate` (Flower's simulation engine, Ray, one process per merchant
    that keeps its module-level caches across rounds);
  - deployed, `subprocess`: a real SuperLink and one SuperNode per merchant on 127.0.0.1, TLS and
    SuperNode authentication on, `[daemon] warm-executor = false` (Flower's fresh `flwr-clientapp`
    process per message: what every deployment did before);
  - deployed, `warm`: the same with the warm executor (`client/daemon/warm_exec.py`, the default now).
From each deployed merchant's log (`state/supernode.log`) it reads, per message, the SuperNode's
"Receiving: <kind> message (ID: x)" and the ClientApp's "ClientApp: <kind> message x received" (the
first line `client/app.py` runs) and the SuperNode's "Sending" of the reply: overhead = received →
ClientApp, and received → reply. Round times come from each run's `metrics.jsonl` (`time_s` is
cumulative: round r lasts time_s[r] − time_s[r−1]; round 0 is the initial evaluation only).

Each deployed merchant runs with OMP_NUM_THREADS = cores ÷ merchants, the share a simulated merchant
gets (Ray gives each 1 CPU and OMP_NUM_THREADS=1); on separate hosts each would have its own cores.

`flwr-clientapp` drops the ClientApp's INFO lines (its root logger is at WARNING; the warm executor
routes them to the merchant's log), so for the `subprocess` run only this bench puts a
`sitecustomize.py` on the PYTHONPATH of Flower's processes that prints the `client.app` logger's INFO
lines in the same format (the SuperNode itself runs with `python -I` and ignores it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

LINE = re.compile(r"^(?:[A-Z]+) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s*:\s*(.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RECEIVING = re.compile(r"Receiving: (\w+) message \(ID: (\w+)\)")
CLIENTAPP = re.compile(r"ClientApp: (\w+) message (\w+) received")
SENDING = re.compile(r"Sending: (\w+) message \(ID: (\w+)\)")

SITECUSTOMIZE = """import logging, sys
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s: %(name)s: %(message)s"))
_app = logging.getLogger("client.app")
_app.setLevel(logging.INFO)
_app.addHandler(_handler)
_app.propagate = False
"""


@dataclass
class MessageTimes:
    merchant: str
    kind: str
    received: float
    stored: float | None = None
    computing: float | None = None
    replied: float | None = None
    sent: float | None = None  # the reply's objects pushed ("Sent successfully")
    gap: float | None = None  # from the previous reply sent to this message's "Receiving"

    @property
    def overhead(self) -> float | None:
        return None if self.computing is None else self.computing - self.received

    @property
    def after_stored(self) -> float | None:
        return None if self.computing is None or self.stored is None else self.computing - self.stored

    @property
    def work(self) -> float | None:
        return None if self.replied is None or self.computing is None else self.replied - self.computing

    @property
    def round_trip(self) -> float | None:
        return None if self.replied is None else self.replied - self.received


@dataclass
class RunResult:
    mode: str
    round_s: list[float]  # round 0, 1, ... durations
    messages: list[MessageTimes] = field(default_factory=list)
    wall_s: float = 0.0


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def messages_from_log(path: Path, merchant: str) -> list[MessageTimes]:
    """Each message the merchant's log shows: received, ClientApp entry, reply sent (epoch seconds)."""
    found: dict[str, MessageTimes] = {}
    order: list[MessageTimes] = []
    waiting: list[MessageTimes] = []  # received, no reply sent yet
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = LINE.match(ANSI.sub("", raw).strip())
        if not match:
            continue
        at, text = _stamp(match.group(1)), match.group(2).strip()
        if m := RECEIVING.search(text):
            entry = MessageTimes(merchant, m.group(1), at)
            found[m.group(2)] = entry
            order.append(entry)
            waiting.append(entry)
        elif m := CLIENTAPP.search(text):
            entered = found.get(m.group(2))
            if entered is not None and entered.computing is None:
                entered.computing = at
        elif text.startswith("Received successfully") and order and order[-1].stored is None:
            order[-1].stored = at
        elif SENDING.search(text) and waiting:
            waiting.pop(0).replied = at
        elif text.startswith("Sent successfully") and order and order[-1].sent is None:
            order[-1].sent = at
    for before, after in itertools.pairwise(order):
        if before.sent is not None:
            after.gap = after.received - before.sent
    return order


def round_durations(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [float(r["time_s"]) for r in sorted(rows, key=lambda r: r["round"])]
    return [b - a for a, b in zip([0.0, *times], times, strict=False)]


def plan(args: argparse.Namespace) -> dict[str, Any]:
    n = args.merchants
    values: dict[str, Any] = {
        "num-rounds": args.rounds,
        "min-train-nodes": n,
        "min-evaluate-nodes": n,
        "min-available-nodes": n,
    }
    if args.backbone:
        values["backbone"] = args.backbone
    return values


def run_simulated(args: argparse.Namespace, root: Path) -> RunResult:
    from simulations.run import simulate

    values = {
        **plan(args),
        "run-name": "simulated",
        "runs-dir": str(root / "runs"),
        "sim-root": str(root / "merchants"),
        "sim-customers": args.customers,
    }
    t0 = time.monotonic()
    run_dir = simulate(values, merchants=args.merchants)
    return RunResult("simulated", round_durations(run_dir), wall_s=time.monotonic() - t0)


def run_deployed(args: argparse.Namespace, root: Path, mode: str) -> RunResult:
    sys.path.insert(0, str(ROOT))  # tests/ is not installed: this bench runs from the checkout
    from tests.deploy_helpers import Deployment

    warm = mode == "warm"
    saved = os.environ.get("PYTHONPATH")
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    # each merchant gets the CPU share a simulated one has (Ray: 1 CPU and OMP_NUM_THREADS=1 per actor):
    # on one host, N merchants' torch pools would otherwise oversubscribe the cores
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.merchants))
    if not warm:  # flwr-clientapp's own interpreter: print client.app's INFO line (see the docstring)
        instrument = root / "instrument"
        instrument.mkdir(parents=True, exist_ok=True)
        (instrument / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        os.environ["PYTHONPATH"] = str(instrument)
    d = Deployment(root, customers=args.customers)
    t0 = time.monotonic()
    try:
        d.start_coordinator()
        names = [f"shop-{i}" for i in range(args.merchants)]
        for i, name in enumerate(names):
            merchant = d.add_merchant(name, i, max_epsilon=args.max_epsilon, backbones=_extra(args))
            toml = merchant.folder / "merchant.toml"
            text = toml.read_text(encoding="utf-8")
            toml.write_text(text.replace("warm-executor = true", f"warm-executor = {str(warm).lower()}"))
            d.merchants[name] = type(merchant).open(merchant.folder)
            d.start_merchant(name)
        d.wait_online(args.merchants, timeout=300)
        launch = d.coordinator.launch(plan(args), name=f"deployed-{mode}")
        status = d.coordinator.wait(launch, args.timeout, quiet=True)
        if status != "finished:completed":
            raise RuntimeError(f"the {mode} run ended {status}")
        messages = [
            m for name in names for m in messages_from_log(d.merchants[name].supernode.log_file, name)
        ]
        return RunResult(mode, round_durations(launch.run_dir), messages, wall_s=time.monotonic() - t0)
    finally:
        survivors = d.shutdown()
        if survivors:
            print(f"warning: processes left running after the {mode} run: {survivors}", file=sys.stderr)
        for key, value in (("PYTHONPATH", saved), ("OMP_NUM_THREADS", saved_threads)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _extra(args: argparse.Namespace) -> tuple[str, ...]:
    return (args.backbone,) if args.backbone else ()


def _fmt(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    return f"{statistics.median(present):5.2f} / {max(present):5.2f}"


def report(results: list[RunResult]) -> str:
    simulated = next((r for r in results if r.mode == "simulated"), None)
    lines = [
        "per message, median / max (s)  received→ClientApp  (stored→ClientApp)  ClientApp→reply  "
        "received→reply  messages",
    ]
    for r in results:
        if r.mode == "simulated":
            continue
        kinds = [(k, [m for m in r.messages if m.kind == k]) for k in sorted({m.kind for m in r.messages})]
        for kind, ms in [*kinds, ("all", r.messages)]:
            lines.append(
                f"  {r.mode:<10} {kind:<9} {_fmt([m.overhead for m in ms]):>17}   "
                f"({_fmt([m.after_stored for m in ms]):>15})   {_fmt([m.work for m in ms]):>15}  "
                f"{_fmt([m.round_trip for m in ms]):>15}  {len(ms):>5}"
            )
    lines.append(
        "  (received: the SuperNode's 'Receiving' line; stored: its 'Received successfully', the message's "
        "objects pulled from the SuperLink)"
    )
    for r in results:
        gaps = [m.gap for m in r.messages]
        if any(g is not None for g in gaps):
            lines.append(
                f"  {r.mode:<10} between messages (reply sent → next received, median / max): {_fmt(gaps)} s "
                "(the coordinator's turn: its reply polling, aggregation; then the SuperNode's pickup)"
            )
    lines.append("")
    lines.append("rounds (s)        round 0   rounds ≥1 (mean)   each               ÷ simulated (rounds ≥1)")
    base = statistics.mean(simulated.round_s[1:]) if simulated and len(simulated.round_s) > 1 else None
    for r in results:
        later = r.round_s[1:]
        mean = statistics.mean(later) if later else float("nan")
        ratio = f"{mean / base:5.2f}" if base else "-"
        each = " ".join(f"{x:.1f}" for x in r.round_s)
        lines.append(f"  {r.mode:<14} {r.round_s[0]:7.1f}   {mean:16.1f}   {each:<18} {ratio}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--merchants", type=int, default=2)
    parser.add_argument("--customers", type=int, default=500, help="base customers per merchant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="", help="backbone id or folder ('' = the packaged MiniLM)")
    parser.add_argument("--modes", default="subprocess,warm", help="deployed modes, in order")
    parser.add_argument("--no-simulation", action="store_true", help="skip the simulated run")
    parser.add_argument(
        "--max-epsilon", type=float, default=8.0, help="each deployed merchant's budget (as simulated)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="most seconds a deployed run may take")
    parser.add_argument("--out", default=None, help="keep the runs and logs here (default: a temp folder)")
    args = parser.parse_args(argv)
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLWR_TELEMETRY_ENABLED": "0",
    }.items():
        os.environ.setdefault(key, value)
    if args.backbone:  # a deployed merchant's policy must list a non-packaged backbone
        os.environ["FEDBEHAVIOR_MERCHANT_POLICY__BACKBONES"] = json.dumps(["", args.backbone])
    root = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"bench_deploy: {args.merchants} merchants × {args.customers} customers, {args.rounds} rounds;"
        f" in {root}"
    )
    results: list[RunResult] = []
    if not args.no_simulation:
        results.append(run_simulated(args, root / "simulated"))
        print(f"  simulated: {results[-1].wall_s:.0f} s", flush=True)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("subprocess", "warm"):
            parser.error(f"unknown mode {mode!r}: subprocess or warm")
        results.append(run_deployed(args, root / mode, mode))
        print(f"  deployed {mode}: {results[-1].wall_s:.0f} s", flush=True)
    print()
    print(report(results))
    (root / "bench_deploy.json").write_text(
        json.dumps(
            [
                {
                    "mode": r.mode,
                    "round_s": r.round_s,
                    "messages": [vars(m) for m in r.messages],
                    "wall_s": r.wall_s,
                }
                for r in results
            ],
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
