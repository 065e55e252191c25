"""The merchant's warm executor (`client/daemon/warm_exec.py`) deployed: on loopback (SuperLink +
2 SuperNodes, TLS and authentication), with an app that differs from the installed copy of the project by
one log line, so the merchants' logs show whose code answered. ClientApps run in forks of a process with
the libraries imported, still only the approved FAB's code, with no zombies, and stop with the SuperNode.
The pieces are tested without a deployment in `tests/test_warm_exec_units.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from client.daemon.control import Merchant
from tests.deploy_helpers import Deployment, wait_for, write_rogue_app

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MARKER = "FAB-MARKER: this ClientApp is the approved FAB's own client/app.py"

# ---------------------------------------------------------------------------------------- deployed

MERCHANTS = ("shop-a", "shop-b")


def mark_the_app(folder: Path) -> None:
    """The FAB's client/app.py logs a line the merchant's installed copy does not have."""
    app = folder / "client" / "app.py"
    app.write_text(app.read_text() + f'\nlogging.getLogger("flwr").info("{MARKER} (%s)", __file__)\n')


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("warm"), edit_app=mark_the_app)
    assert MARKER not in (ROOT / "client" / "app.py").read_text()
    d.start_coordinator()
    for index, name in enumerate(MERCHANTS):
        d.add_merchant(name, index, backbones=(tiny_bert,))
        d.start_merchant(name)
    try:
        d.wait_online(len(MERCHANTS), timeout=180)
        yield d
    finally:
        survivors = d.shutdown()
        assert survivors == [], f"processes left running: {survivors}"


def warm_executor_of(merchant: Merchant) -> psutil.Process:
    pid = merchant.supernode.pid()
    assert pid is not None
    (proc,) = [
        p for p in psutil.Process(pid).children() if "client.daemon.warm_exec" in " ".join(p.cmdline())
    ]
    return proc


def log_of(merchant: Merchant) -> str:
    return merchant.supernode.log_file.read_text(errors="replace")


@pytest.fixture(scope="module")
def one_round(deployment: Deployment, tiny_bert: str) -> tuple[Any, str]:
    overrides = {
        "backbone": tiny_bert,
        "num-rounds": 1,
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "min-available-nodes": 2,
        "batch-size": 16,
        "max-length": 32,
        "lora-r": 2,
        "noise-multiplier": 1.0,
    }
    launch = deployment.coordinator.launch(overrides, name="warm")
    return launch, deployment.coordinator.wait(launch, 900, quiet=True)


def test_two_merchants_complete_a_round_with_the_fabs_code(
    deployment: Deployment, one_round: tuple[Any, str]
) -> None:
    launch, status = one_round
    assert status == "finished:completed"
    rows = [json.loads(x) for x in (launch.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in rows] == [0, 1]
    assert {m: v["status"] for m, v in rows[1]["merchants"].items()} == dict.fromkeys(MERCHANTS, "trained")
    for name in MERCHANTS:
        merchant = deployment.merchants[name]
        log = log_of(merchant)
        apps = merchant.settings.state_dir / "flwr" / "apps"
        # every message (evaluate 0, train 1, evaluate 1) ran the FAB's client/app.py, installed by Flower
        assert log.count(MARKER) == 3 and f"({apps}" in log
        assert "Warm executor: " in log and "preloaded" in log
        assert "Start `flwr-clientapp` process" not in log  # no fresh interpreter per message
        assert "--isolation process" in " ".join(psutil.Process(merchant.supernode.pid()).cmdline())


def test_no_zombies_after_a_run(deployment: Deployment, one_round: tuple[Any, str]) -> None:
    for name in MERCHANTS:
        executor = warm_executor_of(deployment.merchants[name])

        def no_children(proc: psutil.Process = executor) -> bool:
            return not proc.children()  # a finished ClientApp is reaped within a poll (0.05 s)

        wait_for(no_children, 10, f"{name}'s ClientApps to be reaped", poll=0.1)
        root = psutil.Process(deployment.merchants[name].supernode.pid())
        zombies = [p.pid for p in root.children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
        assert zombies == []


def test_an_unapproved_app_is_still_refused(deployment: Deployment, one_round: tuple[Any, str]) -> None:
    d = deployment
    rogue = write_rogue_app(d.root / "rogue")
    out = d.coordinator.folder / "rogue-replies.json"
    overrides = d.root / "rogue.toml"
    overrides.write_text(f"out-file = {json.dumps(str(out))}\nnodes = {len(MERCHANTS)}\n")
    answer = d.coordinator.flwr("run", str(rogue), "--run-config", str(overrides))
    run_id = int(answer["run-id"])
    wait_for(lambda: d.coordinator.flower_status(run_id).startswith("finished"), 240, f"rogue run {run_id}")
    replies = json.loads(out.read_text())
    assert len(replies) == len(MERCHANTS)
    assert all(
        r["content"] is None and r["error"]["reason"] == "The FAB could not be verified." for r in replies
    )
    for name in MERCHANTS:
        merchant = d.merchants[name]
        assert f"Refusing run {run_id}" in log_of(merchant)
        assert not list((merchant.settings.state_dir / "flwr").rglob("rogue_app.py"))


def test_stop_stops_the_supernode_its_warm_executor_and_their_children(
    deployment: Deployment, one_round: tuple[Any, str]
) -> None:
    merchant = deployment.merchants["shop-b"]
    root = merchant.supernode.pid()
    executor = warm_executor_of(merchant)
    tree = [p.pid for p in psutil.Process(root).children(recursive=True)] if root else []
    assert executor.pid in tree
    assert merchant.stop()
    time.sleep(0.5)
    alive = [
        p for p in [root, *tree] if p and psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
    ]
    assert alive == []
    assert merchant.supernode.pid() is None
