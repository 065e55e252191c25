"""The merchant's SuperNode process: Flower's `flower-supernode` that runs only apps the merchant approved.

`fedbehavior merchant start` runs `python -I -m client.daemon.supernode --merchant-dir DIR <flower-supernode
arguments, --trusted-entities included>`. This module is the merchant's own installed code (never
part of a FAB; `-I` keeps the working folder off `sys.path`). Before Flower's SuperNode starts, it
wraps the connection's `get_fab` so that every FAB fetched from the coordinator carries the merchant's
stored approval for exactly those bytes, or none. Flower's own `--trusted-entities` check then verifies
the Ed25519 signature over sha256(content) and either runs the app or answers the run with an error,
executing nothing of it. If the wrapper cannot be installed the SuperNode does not start; had it been
skipped anyway, Flower would refuse every FAB (no verification entry at all), so it fails closed.

With `--isolation process` (the default of `fedbehavior merchant start`, `[daemon] warm-executor`)
this launcher also starts the merchant's warm SuperExec (`client/daemon/warm_exec.py`) as its own child,
the way Flower's SuperNode starts `flower-superexec` in subprocess mode: one process tree per merchant
(stopping or killing the SuperNode takes its ClientApps with it) and one log. The two share a fresh
SuperExec auth secret (Flower's HMAC on task acquisition, `state/superexec-auth.secret`, 0600), so no
other local process can claim the merchant's tasks. If the warm executor dies, the SuperNode stops
rather than hold messages nothing will answer. The SuperNode's log lines carry timestamps, and it asks
the SuperLink for messages every 0.5 s instead of Flower's 3 s (`eager`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from client.daemon.trust import KEY_ID, VALID_LICENSE, TrustStore

log = logging.getLogger("flwr")  # Flower's logger: the refusal lands in the SuperNode log, formatted alike

REFUSED = {VALID_LICENSE: "Valid"}  # lets Flower's check run; with no trusted signature it refuses the FAB


def approved_verifications(store: TrustStore, fab_hash: str, content: bytes, run_id: int) -> dict[str, str]:
    """The verifications to attach to a fetched FAB; logs why a FAB is refused."""
    digest = hashlib.sha256(content).hexdigest()
    try:
        verifications = store.verifications(content)
    except Exception as err:  # a broken approvals file refuses everything rather than crashing the node
        log.error("Refusing run %s: cannot read %s (%s)", run_id, store.approvals_path, err)
        return dict(REFUSED)
    if KEY_ID not in verifications:
        log.error(
            "Refusing run %s: its app (FAB sha256 %s, %d bytes) is not an app this merchant approved; "
            "none of its code runs and no data is sent. To allow it, review it with "
            "`fedbehavior merchant trust <app folder or .fab>`",
            run_id,
            digest,
            len(content),
        )
        return dict(REFUSED)
    if fab_hash != digest:  # stored under the name the coordinator gave: names and bytes must agree
        log.error(
            "Refusing run %s: the coordinator calls FAB %s what has sha256 %s", run_id, fab_hash, digest
        )
        return dict(REFUSED)
    log.info("Run %s: app %s is approved by this merchant", run_id, digest[:16])
    return verifications


def approving(get_fab: Callable[[str, int], Any], store: TrustStore) -> Callable[[str, int], Any]:
    """`get_fab` whose FABs carry this merchant's approval (or none) instead of what the SuperLink sent."""
    from flwr.supercore.fab import Fab

    def get_fab_with_approval(fab_hash: str, run_id: int) -> Fab:
        fab = get_fab(fab_hash, run_id)
        verifications = approved_verifications(store, fab.hash_str, fab.content, run_id)
        return Fab(fab.hash_str, fab.content, verifications)

    get_fab_with_approval.__name__ = "get_fab"
    return get_fab_with_approval


RECEIVE_POLL_S = 0.5
"""How often the SuperNode asks the SuperLink for a message while one may come (Flower: every 3 s)."""
RECEIVE_WINDOW_S = 30.0
"""After this long without a message, Flower's own 3 s pause comes back once (an idle merchant asks
~2 times a second, not 20)."""


def eager(
    receive: Callable[[], Any], interval: float = RECEIVE_POLL_S, window: float = RECEIVE_WINDOW_S
) -> Callable[[], Any]:
    """`receive` that asks again every `interval` s for up to `window` s before it reports "nothing".

    Flower's SuperNode sleeps 3 s after every empty pull, so a message waited 1.5 s on average (up to
    3 s) on the SuperLink before the merchant even saw it, twice a round."""

    def receive_eagerly() -> Any:
        deadline = time.monotonic() + window
        while True:
            received = receive()
            if received is not None or time.monotonic() + interval > deadline:
                return received
            time.sleep(interval)

    receive_eagerly.__name__ = "receive"
    return receive_eagerly


def install(store: TrustStore) -> None:
    """Wrap the `get_fab` (approval) and `receive` (polling) of every SuperLink connection Flower's
    SuperNode opens."""
    from flwr.supernode import start_client_internal as flower

    original = getattr(flower, "_init_connection", None)
    if original is None:
        raise SystemExit(
            "this Flower version has no supernode.start_client_internal._init_connection: fedbehavior's "
            "app-approval check cannot be installed, so the SuperNode is not started; install flwr==1.41.0"
        )

    @contextlib.contextmanager
    def connection(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        with original(*args, **kwargs) as conn:
            parts = list(conn)
            where = [i for i, part in enumerate(parts) if getattr(part, "__name__", "") == "get_fab"]
            if len(where) != 1:
                raise RuntimeError(
                    "Flower's SuperLink connection has no single `get_fab`: the app-approval check cannot "
                    "be installed, so the SuperNode stops; install flwr==1.41.0"
                )
            parts[where[0]] = approving(parts[where[0]], store)
            # polling is only speed: a Flower without a `receive` here keeps its own 3 s pause
            for i, part in enumerate(parts):
                if getattr(part, "__name__", "") == "receive":
                    parts[i] = eager(part)
            yield tuple(parts)

    flower._init_connection = connection  # type: ignore[assignment]


SECRET_FILE = "superexec-auth.secret"


def runtime_options(args: list[str]) -> argparse.Namespace:
    """The flower-supernode options that say how a SuperExec reaches the Runtime API."""
    from flwr.common.constant import ISOLATION_MODE_SUBPROCESS
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--isolation", default=ISOLATION_MODE_SUBPROCESS)
    parser.add_argument("--host", default=UVICORN_DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=SUPERNODE_UVICORN_DEFAULT_PORT)
    parser.add_argument("--ssl-certfile", default=None)
    parser.add_argument("--ssl-ca-certfile", default=None)
    parser.add_argument("--superexec-auth-secret-file", default=None)
    return parser.parse_known_args(args)[0]


def write_secret(path: Path) -> Path:
    """A fresh SuperExec auth secret, readable by the merchant's user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


def warm_executor_command(options: argparse.Namespace, secret: Path | None) -> list[str]:
    """`python -I -m client.daemon.warm_exec ...` for a SuperNode started with `options` (its parent)."""
    from flwr.supercore.address import resolve_bind_address

    address = resolve_bind_address(f"{options.host}:{options.port}")
    cmd = [sys.executable, "-I", "-m", "client.daemon.warm_exec", "--runtime-api-address", address]
    cmd += ["--parent-pid", str(os.getpid())]
    if options.ssl_certfile and options.ssl_ca_certfile:  # the Runtime API speaks TLS: verify it with its CA
        cmd += ["--root-certificates", str(Path(options.ssl_ca_certfile).expanduser())]
    else:
        cmd += ["--insecure"]
    if secret is not None:
        cmd += ["--superexec-auth-secret-file", str(secret)]
    return cmd


def start_warm_executor(cmd: list[str]) -> subprocess.Popen[bytes]:
    """Start the warm executor; stop this SuperNode if it ever exits abnormally."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def watch() -> None:
        code = proc.wait()
        if code != 0:  # 0: it stopped because we did (SIGTERM/SIGINT are graceful exits)
            log.error(
                "The warm ClientApp executor (pid %d) exited with %d: no message would be answered, so "
                "the SuperNode stops; see the lines above, or set [daemon] warm-executor = false",
                proc.pid,
                code,
            )
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="warm-executor-watch", daemon=True).start()
    return proc


def main(argv: list[str] | None = None) -> None:
    """Parse `--merchant-dir`, install the approval check, hand the other arguments to Flower."""
    parser = argparse.ArgumentParser(prog="python -m client.daemon.supernode", add_help=False)
    parser.add_argument("--merchant-dir", required=True)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "--trusted-entities" not in rest:
        raise SystemExit(
            "--trusted-entities is missing: without it Flower runs any app; start the SuperNode with "
            "`fedbehavior merchant start`"
        )
    install(TrustStore(Path(known.merchant_dir)))
    from flwr.common.constant import ISOLATION_MODE_PROCESS
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=sys.stderr.isatty())
    options = runtime_options(rest)
    if options.isolation == ISOLATION_MODE_PROCESS:
        secret = options.superexec_auth_secret_file
        if secret is None:
            from client.settings import MerchantSettings

            state = MerchantSettings.from_merchant_dir(Path(known.merchant_dir)).state_dir
            secret = str(write_secret(state / SECRET_FILE))
            rest += ["--superexec-auth-secret-file", secret]
        start_warm_executor(warm_executor_command(options, Path(secret)))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
