"""The warm executor's pieces (`client/daemon/warm_exec.py`, `client/daemon/supernode.py`), without a
deployment: a child imports the project only from the FAB, children are reaped and limited, the
commands are right. `tests/test_warm_exec.py` runs the whole thing on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from client.daemon import supernode, warm_exec
from client.daemon.control import Merchant, init_merchant
from tests.deploy_helpers import wait_for, write_rogue_app


def spec(task_id: int = 1) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address="127.0.0.1:1",
        token="token",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=None,
        suppress_output=True,
        task_id=task_id,
    )


# ---------------------------------------------------------------------------------------- the child

CHILD_SCRIPT = """
import json, os, sys
from pathlib import Path
import client.daemon.control  # the merchant's installed copy, imported before the fork as a stale module
from client.daemon import warm_exec
from flwr.supercore.exit import exit_handler
from flwr.supercore.object_ref import load_app

fab = Path(sys.argv[1])
exit_handler.add_exit_handler(lambda: print("the parent's exit handler ran in the child"))
roots = warm_exec.installed_project_roots()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    out = {}
    warm_exec._reset_inherited_state()
    out["exit_handlers"] = len(exit_handler.registered_exit_handlers)
    out["dropped"] = warm_exec.forget_project_modules(roots)
    out["marker"] = load_app("client.app:MARKER", ValueError, fab)
    import client.app
    out["app_file"] = client.app.__file__
    for name in ("client.daemon.control", "shared.config"):
        try:
            __import__(name)
            out[name] = "imported"
        except ImportError as err:
            out[name] = str(err)
    os.write(write, json.dumps(out).encode())
    os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
print(os.read(read, 1 << 20).decode())
"""


def test_a_child_imports_the_project_only_from_the_fab(tmp_path: Path) -> None:
    fab = tmp_path / "fab"
    (fab / "client").mkdir(parents=True)
    (fab / "client" / "__init__.py").write_text("")
    (fab / "client" / "app.py").write_text('MARKER = "the FAB\'s client/app.py"\n')
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD_SCRIPT, str(fab)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["exit_handlers"] == 0  # the SuperExec's handlers (close its client, stop children) are gone
    assert "client.daemon.control" in out["dropped"] and "client.daemon.warm_exec" in out["dropped"]
    assert out["marker"] == "the FAB's client/app.py"
    assert out["app_file"] == str(fab / "client" / "app.py")
    # a module the FAB lacks is not taken from the merchant's installed copy instead
    assert "not in the approved app" in out["client.daemon.control"]
    assert "not in the approved app" in out["shared.config"]


def test_preload_refuses_project_code_and_skips_what_is_missing() -> None:
    with pytest.raises(ValueError, match="never preloads"):
        warm_exec.preload(["shared.config"])
    done, skipped = warm_exec.preload(["json", "no_such_module_here", "json:dumps", "json:no_such_name"])
    assert done == ["json", "json:dumps"] and skipped == ["no_such_module_here", "json:no_such_name"]
    assert all(name.split(".")[0] not in warm_exec.PROJECT_PACKAGES for name in warm_exec.PRELOAD)


# ---------------------------------------------------------------------------------------- executor


def test_fork_executor_reaps_children_and_gates_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    def child(spec: ExecutionSpec, *_: Any) -> None:
        time.sleep(0.3 if spec.task_id == 1 else 60)
        os._exit(3)

    monkeypatch.setattr(warm_exec, "run_child", child)
    executor = warm_exec.ForkExecutor(max_children=1, stop_timeout=2.0)
    everything = set(TaskType)
    assert executor.get_eligible_capacity(everything) == ({TaskType.CLIENT_APP}, set())
    assert executor.launch(spec(1)).status == LaunchResultStatus.ACCEPTED
    (pid,) = executor.children
    # one ClientApp at a time: nothing is acquired while it runs, and a launch is refused
    assert executor.get_eligible_capacity(everything) == (set(), set())
    assert executor.launch(spec(2)).status == LaunchResultStatus.CAPACITY_REJECTED

    def reaped() -> bool:
        executor.reconcile()
        return not executor.children

    wait_for(reaped, 30, "the child to be reaped", poll=0.05)
    assert not psutil.pid_exists(pid)  # reaped: not even a zombie is left
    assert executor.launch(spec(3)).status == LaunchResultStatus.ACCEPTED
    (pid,) = executor.children
    executor.close()  # SuperExec shutdown stops and reaps a running child
    assert executor.children == {} and not psutil.pid_exists(pid)
    not_clientapp = ExecutionSpec(**{**spec(4).__dict__, "task_type": TaskType.SERVER_APP})
    assert executor.launch(not_clientapp).status == LaunchResultStatus.FAILED


def test_a_clientapp_that_never_gets_its_message_does_not_block_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Flower 1.41 leaves a task behind when a run stops while the SuperNode pulls its message; that
    # task's ClientApp waits forever (seen in tests/test_deploy.py's coordinator-killed run)
    def child(*_: Any) -> None:
        time.sleep(60)
        os._exit(0)

    monkeypatch.setattr(warm_exec, "run_child", child)
    executor = warm_exec.ForkExecutor(max_children=1, settle_s=0.5, max_total=2, stop_timeout=2.0)
    everything = set(TaskType)
    try:
        assert executor.launch(spec(1)).status == LaunchResultStatus.ACCEPTED
        assert executor.get_eligible_capacity(everything) == (set(), set())  # settling: one at a time
        time.sleep(0.6)
        assert executor.get_eligible_capacity(everything) == ({TaskType.CLIENT_APP}, set())
        assert executor.launch(spec(2)).status == LaunchResultStatus.ACCEPTED
        time.sleep(0.6)
        assert executor.get_eligible_capacity(everything) == (set(), set())  # max_total children
        assert executor.launch(spec(3)).status == LaunchResultStatus.CAPACITY_REJECTED
    finally:
        pids = list(executor.children)
        executor.close()
    assert executor.children == {} and not any(psutil.pid_exists(p) for p in pids)


def test_the_patch_into_flowers_superexec_is_in_place() -> None:
    from flwr.supercore.superexec import run_superexec

    original = run_superexec.get_executor
    executor = warm_exec.ForkExecutor()
    try:
        warm_exec.install_executor(executor)
        assert run_superexec.get_executor(ExecutorType.SUBPROCESS) is executor
    finally:
        run_superexec.get_executor = original  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------- commands


def test_merchant_start_uses_the_warm_executor_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "m"
    init_merchant(folder, merchant_id="m", superlink="h:1", root_certificates=None, insecure=True)
    assert "warm-executor = true" in (folder / "merchant.toml").read_text()
    Merchant.open(folder).trust.approve(_bundle(tmp_path))
    cmd = Merchant.open(folder).supernode_command()
    assert cmd[cmd.index("--isolation") + 1] == "process"
    monkeypatch.setenv("FEDBEHAVIOR_MERCHANT_DAEMON__WARM_EXECUTOR", "false")
    cmd = Merchant.open(folder).supernode_command()
    assert cmd[cmd.index("--isolation") + 1] == "subprocess"  # Flower's fresh process per message


def _bundle(tmp_path: Path) -> Any:
    from client.daemon.trust import AppBundle

    return AppBundle.load(write_rogue_app(tmp_path / "rogue"))


def test_the_warm_executor_command_follows_the_supernodes_runtime_api(tmp_path: Path) -> None:
    options = supernode.runtime_options(["--isolation", "process", "--host", "0.0.0.0", "--port", "9123"])
    cmd = supernode.warm_executor_command(options, tmp_path / "secret")
    assert cmd[1:4] == ["-I", "-m", "client.daemon.warm_exec"]
    assert cmd[cmd.index("--runtime-api-address") + 1] == "127.0.0.1:9123"
    assert cmd[cmd.index("--parent-pid") + 1] == str(os.getpid())
    assert "--insecure" in cmd and cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(
        tmp_path / "secret"
    )
    tls = supernode.runtime_options(
        ["--ssl-certfile", "s.crt", "--ssl-keyfile", "s.key", "--ssl-ca-certfile", str(tmp_path / "ca.crt")]
    )
    cmd = supernode.warm_executor_command(tls, None)
    assert "--insecure" not in cmd and cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    secret = supernode.write_secret(tmp_path / "state" / "secret")
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32
    assert supernode.write_secret(secret).read_bytes() != b""  # rewritten at every start


def test_warm_exec_module_imports_no_project_code() -> None:
    script = textwrap.dedent(
        """
        import sys
        import client.daemon.warm_exec
        own = ('client', 'server', 'shared', 'simulations')
        print(sorted(m for m in sys.modules if m.split('.')[0] in own))
        """
    )
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "['client', 'client.daemon', 'client.daemon.warm_exec']", out.stderr


def test_the_supernode_asks_for_messages_every_half_second_not_every_three() -> None:
    answers = iter([None, None, "message"])
    calls: list[float] = []

    def receive() -> Any:
        calls.append(time.monotonic())
        return next(answers)

    eager = supernode.eager(receive, interval=0.05, window=5.0)
    assert eager.__name__ == "receive"  # the name the connection's parts are found by
    assert eager() == "message" and len(calls) == 3
    assert calls[-1] - calls[0] < 1.0
    calls.clear()
    idle = supernode.eager(lambda: calls.append(time.monotonic()), interval=0.05, window=0.3)
    assert idle() is None and 3 <= len(calls) <= 7  # then Flower's own pause
