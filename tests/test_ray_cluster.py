"""Simulation on an existing Ray cluster: a head and a worker started with `ray start` on loopback, a
2-merchant, 1-round simulation through `fedbehavior simulate --ray-address`, and no deprecation notice
on the way."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(RAY), *args], capture_output=True, text=True, timeout=180, env=env)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    if not RAY.exists():
        pytest.skip("the ray command is not installed beside this Python")
    address = f"127.0.0.1:{_free_port()}"
    head = _ray(
        "start", "--head", "--port", address.split(":")[1], "--num-cpus", "1", "--include-dashboard=false"
    )
    assert head.returncode == 0, head.stdout + head.stderr
    try:
        worker = _ray("start", "--address", address, "--num-cpus", "1")
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield address
    finally:
        _ray("stop", "--force")


def test_a_simulation_runs_on_an_existing_ray_cluster(cluster: str, tiny_bert: str, tmp_path: Path) -> None:
    for _ in range(30):  # a head and a worker (the worker registers within seconds)
        status = _ray("status", "--address", cluster)
        if status.stdout.count("node_") >= 2:
            break
        time.sleep(1)
    assert status.stdout.count("node_") >= 2, status.stdout
    runs = tmp_path / "runs"
    cmd = [
        str(Path(sys.executable).with_name("fedbehavior")),
        "simulate",
        "--merchants",
        "2",
        "--rounds",
        "1",
        "--name",
        "on-cluster",
        "--runs-dir",
        str(runs),
        "--ray-address",
        cluster,
        "--set",
        f"backbone={tiny_bert}",
        "--set",
        "sim-customers=40",
        "--set",
        "max-length=24",
        "--set",
        f"sim-root={tmp_path / 'merchants'}",
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "DEPRECATED" not in output and "deprecated" not in output.lower(), output[-4000:]
    assert f"simulating 2 merchants on the Ray cluster at {cluster}" in output, output[-4000:]
    rows = [json.loads(line) for line in (runs / "on-cluster" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert {m["status"] for m in rows[1]["merchants"].values()} == {"trained"}
    assert (runs / "on-cluster" / "final" / "adapter_config.json").exists()
    shutil.rmtree(runs, ignore_errors=True)
