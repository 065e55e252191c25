"""The coordinator's deployment: a Flower SuperLink daemon, and runs launched on it with `flwr run`.

Everything lives in the coordinator's home folder (`--home`, `FEDBEHAVIOR_HOME`, default
`~/.fedbehavior`):

    coordinator.toml      settings (optional; environment FEDBEHAVIOR_COORDINATOR_* overrides it)
    certs/                ca.crt, server.pem, server.key (TLS; `coordinator dev-certs` for development)
    state.db              the SuperLink's state (registered merchants, runs, messages)
    superlink.log/.pid    the daemon
    flwr/config.toml      the `flwr` CLI's connection to this SuperLink (written by `start`)
    runs/<run-name>/      metrics.jsonl, checkpoints/, final/, launches.json (Flower run ids)

Flower does the networking; this module only starts its processes with the right flags and reads
their answers (`--format json`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.config import RunConfig
from shared.daemon import Daemon, flower_env, flower_executable, wait_for_port
from shared.fileio import atomic_write_json
from shared.settings import FileSettings, read_toml

CONNECTION = "fedbehavior"
SETTINGS_FILE = "coordinator.toml"
INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! INSECURE MODE: no TLS and no merchant authentication. Adapter updates and metrics travel in    !!
!! plaintext and any process that reaches this port can join as a merchant. Development only.     !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


class CoordinatorSettings(FileSettings):
    """How the SuperLink is started and how the coordinator's own CLI reaches it."""

    model_config = SettingsConfigDict(env_prefix="FEDBEHAVIOR_COORDINATOR_")

    host: str = Field("0.0.0.0", description="interface the SuperLink listens on")
    port: int = Field(8000, gt=0, lt=65536, description="one port: Fleet (merchants) and Control (flwr)")
    address: str = Field("", description="host:port the coordinator's CLI dials; default 127.0.0.1:port")
    ssl_certfile: Path = Path("certs/server.pem")
    ssl_keyfile: Path = Path("certs/server.key")
    ssl_ca_certfile: Path = Path("certs/ca.crt")
    supernode_auth: bool = Field(True, description="only registered merchant keys may connect")
    insecure: bool = Field(False, description="plaintext, unauthenticated: development only")
    database: Path = Path("state.db")
    runs_dir: Path = Path("runs")
    app: Path | None = Field(
        None, description="the Flower app folder runs submit (default: this project's source folder)"
    )
    start_timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _auth_off_only_when_insecure(self) -> CoordinatorSettings:
        if not self.supernode_auth and not self.insecure:
            raise ValueError(
                "supernode-auth = false lets any process that reaches the port join as a merchant: it is "
                "allowed only with insecure = true (development, `coordinator start --insecure`); remove it"
            )
        return self

    @property
    def dial_address(self) -> str:
        return self.address or f"127.0.0.1:{self.port}"


def default_home() -> Path:
    return Path(os.environ.get("FEDBEHAVIOR_HOME", Path.home() / ".fedbehavior")).expanduser()


def app_dir() -> Path:
    """The Flower app folder (this project's root, with [tool.flwr.app] in pyproject.toml)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists():
        raise FileNotFoundError(
            f"no pyproject.toml beside {root}: the coordinator needs the project folder to launch runs; "
            f"install fedbehavior from its source tree with `pip install -e .`"
        )
    return root


@dataclass(frozen=True)
class CoordinatorHome:
    folder: Path
    settings: CoordinatorSettings

    @classmethod
    def open(cls, folder: Path | None = None, **flags: Any) -> CoordinatorHome:
        folder = (folder or default_home()).expanduser().resolve()
        return cls(folder, CoordinatorSettings.load(folder / SETTINGS_FILE, **flags))

    @property
    def superlink(self) -> Daemon:
        return Daemon("superlink", self.folder)

    @property
    def flwr_home(self) -> Path:
        return self.folder / "flwr"

    @property
    def runs(self) -> Path:
        return self.settings.runs_dir

    @property
    def app(self) -> Path:
        """The app folder `flwr run` packs into the FAB every merchant must have approved."""
        return self.settings.app or app_dir()

    def env(self) -> dict[str, str]:
        return {**flower_env(self.flwr_home), "FEDBEHAVIOR_HOME": str(self.folder)}

    # ---------------------------------------------------------------- SuperLink daemon

    def superlink_command(self) -> list[str]:
        s = self.settings
        cmd = [
            flower_executable("flower-superlink"),
            "--database",
            str(s.database),
            "--host",
            s.host,
            "--port",
            str(s.port),
            "--disable-runtime-dependency-installation",
        ]
        if s.insecure:
            return [*cmd, "--insecure"]
        for path, key in (
            (s.ssl_certfile, "ssl-certfile"),
            (s.ssl_keyfile, "ssl-keyfile"),
            (s.ssl_ca_certfile, "ssl-ca-certfile"),
        ):
            if not path.exists():
                raise FileNotFoundError(
                    f"no TLS file at {path} ({key}). For a try-out create a development CA with "
                    f"`fedbehavior coordinator dev-certs --home {self.folder} --host <name merchants dial>`, "
                    f"or set {key} in {self.folder / SETTINGS_FILE} to your organisation's certificate; "
                    f"--insecure runs without TLS (development only)"
                )
        cmd += ["--ssl-certfile", str(s.ssl_certfile), "--ssl-keyfile", str(s.ssl_keyfile)]
        cmd += ["--ssl-ca-certfile", str(s.ssl_ca_certfile)]
        if s.supernode_auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def write_flwr_config(self) -> Path:
        """The `flwr` CLI's connection named `fedbehavior`, pointing at this SuperLink."""
        s = self.settings
        conn: dict[str, Any] = {"address": s.dial_address}
        if s.insecure:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(s.ssl_ca_certfile)
        path = self.flwr_home / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}), encoding="utf-8"
        )
        return path

    def start(self) -> int:
        if self.settings.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        cmd = self.superlink_command()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write_flwr_config()
        pid = self.superlink.start(cmd, env=self.env())
        host, port = self.settings.dial_address.rsplit(":", 1)
        wait_for_port(host, int(port), self.settings.start_timeout_s, self.superlink)
        return pid

    def stop(self) -> bool:
        return self.superlink.stop()

    # ---------------------------------------------------------------- flwr CLI

    def flwr(self, *args: str, timeout: float = 120.0) -> Any:
        """Run `flwr <args> fedbehavior --format json` and return its parsed JSON answer."""
        if self.superlink.pid() is None and not self.settings.address:
            raise RuntimeError(
                f"no SuperLink runs from {self.folder}: start it with `fedbehavior coordinator start`"
            )
        cmd = [flower_executable("flwr"), *args, CONNECTION, "--format", "json"]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env()},
            timeout=timeout,
            cwd=self.folder,
        )
        try:
            answer = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"`flwr {' '.join(args)}` failed (exit {proc.returncode}): "
                f"{proc.stdout[-2000:]} {proc.stderr[-2000:]}"
            ) from None
        if isinstance(answer, dict) and answer.get("success") is False:
            raise RuntimeError(f"`flwr {args[0]}` refused: {answer.get('error-message', answer)}")
        return answer

    def register(self, public_key: Path, name: str = "") -> Any:
        """Allow the merchant holding the private half of `public_key` to connect."""
        args = ["supernode", "register", str(Path(public_key).resolve())]
        if name:
            args += ["--name", name]
        return self.flwr(*args)

    def merchants(self) -> list[dict[str, Any]]:
        answer = self.flwr("supernode", "list")
        return list(answer.get("nodes", [])) if isinstance(answer, dict) else []

    def flower_runs(self) -> list[dict[str, Any]]:
        answer = self.flwr("list")
        return list(answer.get("runs", [])) if isinstance(answer, dict) else []

    def launch(self, overrides: dict[str, Any], *, name: str = "", resume: str = "") -> Launch:
        """Submit a run (`flwr run`) with run-config overrides; `resume` names a run to continue."""
        if resume:
            if not (self.runs / resume).is_dir():
                known = ", ".join(sorted(p.name for p in self.runs.glob("*") if p.is_dir())) or "none"
                raise FileNotFoundError(f"no run named {resume!r} in {self.runs} (runs: {known})")
            name = resume
            self.stop_run(resume)  # a run left "running" by a dead coordinator must not compete
        name = name or f"run-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        run_dir = self.runs / name
        if (run_dir / "metrics.jsonl").exists() and not resume:
            raise FileExistsError(
                f"run {name!r} exists in {self.runs}: pick another --name, or --resume {name}"
            )
        values = {**overrides, "run-name": name, "runs-dir": str(self.runs), "resume": bool(resume)}
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides_file = run_dir / ("overrides-resume.toml" if resume else "overrides.toml")
        overrides_file.write_text(tomli_w.dumps(values), encoding="utf-8")
        answer = self.flwr("run", str(self.app), "--run-config", str(overrides_file))
        run_id = int(answer["run-id"])
        launches = _read_json(run_dir / "launches.json", [])
        launches.append({"flower-run-id": run_id, "resume": bool(resume), "submitted": _now()})
        atomic_write_json(run_dir / "launches.json", launches)
        return Launch(name, run_id, run_dir)

    def run_ids(self, name: str) -> list[int]:
        return [int(x["flower-run-id"]) for x in _read_json(self.runs / name / "launches.json", [])]

    def flower_status(self, run_id: int) -> str:
        for run in self.flower_runs():
            if int(run.get("run-id", -1)) == run_id:
                return str(run.get("status", "unknown"))
        return "unknown"

    def wait(self, launch: Launch, timeout: float, poll: float = 2.0, *, quiet: bool = False) -> str:
        """Block until the Flower run ends; return its final status (e.g. `finished:completed`).

        While it waits it prints each round's row of the console table to stdout as the round lands
        in `metrics.jsonl` (`server.metrics.RoundFollower`), unless `quiet`."""
        from server.metrics import RoundFollower

        follower = None if quiet else RoundFollower(launch.run_dir / "metrics.jsonl", sys.stdout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.flower_status(launch.run_id)
            if follower is not None:
                follower.poll()
            if status.startswith("finished"):
                return status
            time.sleep(poll)
        raise TimeoutError(
            f"run {launch.name} (flower run {launch.run_id}) not finished after {timeout:.0f} s"
        )

    def stop_run(self, name: str) -> list[int]:
        """Ask the SuperLink to stop every unfinished Flower run of `name`."""
        ids = self.run_ids(name)
        if not ids:
            return []
        status = {int(r.get("run-id", -1)): str(r.get("status", "")) for r in self.flower_runs()}
        stopped = []
        for run_id in ids:
            if not status.get(run_id, "").startswith("finished"):
                self.flwr("stop", str(run_id))
                stopped.append(run_id)
        return stopped


@dataclass(frozen=True)
class Launch:
    name: str
    run_id: int
    run_dir: Path


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Last completed round, planned rounds, global metrics and each merchant's status and epsilon."""
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
    planned = RunConfig().num_rounds
    for name in ("overrides-resume.toml", "overrides.toml"):
        path = run_dir / name
        if path.exists():
            planned = read_toml(path).get("num_rounds", planned)
            break
    merchants: dict[str, dict[str, Any]] = {}
    for row in rows:
        for merchant, entry in row.get("merchants", {}).items():
            merchants.setdefault(merchant, {}).update(
                {
                    "status": entry.get("status"),
                    "reason": entry.get("reason", ""),
                    "round": row["round"],
                    "epsilon": entry.get("epsilon"),
                }
            )
    from server.metrics import FAILURE_FILE

    failure = _read_json(run_dir / FAILURE_FILE, None)
    if isinstance(failure, dict):  # the round that stopped the run: each merchant's public reason
        for merchant, entry in dict(failure.get("merchants", {})).items():
            merchants.setdefault(merchant, {}).update({**entry, "round": failure.get("round")})
    return {
        "run": run_dir.name,
        "round": rows[-1]["round"] if rows else None,
        "planned_rounds": planned,
        "global": rows[-1].get("global", {}) if rows else {},
        "merchants": merchants,
        "final": (run_dir / "final").is_dir(),
        **({"failure": failure.get("error")} if isinstance(failure, dict) else {}),
    }


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
