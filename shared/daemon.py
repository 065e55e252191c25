"""Background processes of the deployment (SuperLink, SuperNode): start, find, stop.

A daemon is a command started in its own session with its output appended to a log file and its pid
in a pid file. Flower's processes start children of their own (SuperExec, ServerApp, ClientApp), some
in new sessions, so stopping means stopping the whole process tree, not only the pid we started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Daemon:
    """A named background process whose pid and log live in `folder`."""

    name: str
    folder: Path

    @property
    def pid_file(self) -> Path:
        return self.folder / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.folder / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid if the process is alive (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                return pid
        except psutil.NoSuchProcess:
            pass
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        running = self.pid()
        if running is not None:
            raise RuntimeError(
                f"{self.name} is already running (pid {running}); stop it first or use its status command"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting {self.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM the process tree, SIGKILL what is left after `timeout`. False if nothing ran."""
        pid = self.pid()
        if pid is None:
            return False
        stop_tree(pid, timeout=timeout)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the whole tree at once: what a power cut or an OOM kill does (used by fault tests)."""
        pid = self.pid()
        if pid is not None:
            stop_tree(pid, timeout=0.0)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, timeout: float) -> None:
    procs = process_tree(pid)
    sig = signal.SIGTERM if timeout > 0 else signal.SIGKILL
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=max(timeout, 0.1))
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5.0)


def wait_for_port(host: str, port: int, timeout: float, daemon: Daemon | None = None) -> None:
    """Return once something accepts TCP connections on host:port; raise with the log tail if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None and daemon.pid() is None:
            raise RuntimeError(f"{daemon.name} exited during start-up:\n{log_tail(daemon.log_file)}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    tail = log_tail(daemon.log_file) if daemon is not None else ""
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s\n{tail}")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"


def flower_executable(name: str) -> str:
    """Path of a Flower console script installed beside this Python (`flower-superlink`, `flwr`…)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError(
        f"{name} not found beside {sys.executable}; install fedbehavior in this environment "
        f"(pip install -e .) so that Flower's command line tools are there"
    )


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for a Flower process: its own FLWR_HOME, no telemetry or runtime installs, no hub,
    and PATH with this Python's bin folder first (Flower starts its helpers by bare name)."""
    return {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
