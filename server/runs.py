"""The coordinator's runs as its folders tell them: `fedbehavior coordinator runs` and `… log RUN`.

A run folder (`<home>/runs/<name>/`, or a simulation's `runs/<name>/`) holds `metrics.jsonl` (one JSON
row per round, round 0 the untrained adapter; the contract in `server.metrics`), `failure.json` when a
round stopped the run, `final/` once the model was exported, and for a deployed run `launches.json`
(the Flower run ids and when each was submitted) and `overrides.toml` (the run-config keys it was
launched with). Everything here reads those files only: no SuperLink, no Flower, and imports light
enough that the commands answer at once (`coordinator status` is the one that asks Flower).

A run's status from its folder:
    failed      failure.json: the round that stopped it and why
    finished    final/ is there
    unfinished  rounds written, neither of the above: still running, or stopped (`coordinator status`)
    submitted   launched (launches.json) but no round written yet
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METRICS_FILE = "metrics.jsonl"
FAILURE_FILE = "failure.json"  # server.metrics.FAILURE_FILE (a test keeps them equal)
LAUNCHES_FILE = "launches.json"
OVERRIDES_FILES = ("overrides-resume.toml", "overrides.toml")  # the latest launch's first
SETTINGS_FILE = "coordinator.toml"
RUNS_DIR_ENV = "FEDBEHAVIOR_COORDINATOR_RUNS_DIR"


# ------------------------------------------------------------------------------- where runs are


def home_folder(home: str | Path | None = None) -> Path:
    """The coordinator's folder: `home`, else $FEDBEHAVIOR_HOME, else ~/.fedbehavior (as
    `server.deploy.CoordinatorHome.open`)."""
    if home:
        return Path(home).expanduser().resolve()
    return Path(os.environ.get("FEDBEHAVIOR_HOME", Path.home() / ".fedbehavior")).expanduser().resolve()


def runs_folder(home: str | Path | None = None) -> Path:
    """The coordinator's runs folder, as its settings give it (`runs-dir` in coordinator.toml or
    $FEDBEHAVIOR_COORDINATOR_RUNS_DIR, relative to the home folder; default `<home>/runs`), read without
    loading the settings model (a test keeps it equal to `CoordinatorHome.open(home).runs`)."""
    folder = home_folder(home)
    value: Any = os.environ.get(RUNS_DIR_ENV) or None
    settings = folder / SETTINGS_FILE
    if value is None and settings.exists():
        try:
            table = tomllib.loads(settings.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{settings} is not valid TOML: {err}") from None
        value = table.get("runs-dir", table.get("runs_dir"))
    path = Path(str(value or "runs")).expanduser()
    return (path if path.is_absolute() else folder / path).resolve()


def resolve_run(run: str | Path, home: str | Path | None = None) -> Path:
    """A run folder given as a path, or as a run's name in the coordinator's runs folder."""
    path = Path(run).expanduser()
    if path.is_dir():
        return path
    runs = runs_folder(home)
    if (runs / str(run)).is_dir():
        return runs / str(run)
    known = ", ".join(p.name for p in run_folders(runs)) or "none"
    raise FileNotFoundError(f"no run {str(run)!r}: neither a folder nor a run in {runs} (runs: {known})")


def run_folders(runs: Path) -> list[Path]:
    """The run folders in `runs` (those with any of a run's files), by name."""
    if not runs.is_dir():
        return []
    marks = (METRICS_FILE, FAILURE_FILE, LAUNCHES_FILE, "final", *OVERRIDES_FILES)
    return sorted(p for p in runs.iterdir() if p.is_dir() and any((p / m).exists() for m in marks))


# ------------------------------------------------------------------------------ reading a run


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of `metrics.jsonl`; a last line still being written is left for the next read."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a writer that is still at it
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def planned_rounds(run_dir: Path) -> int | None:
    """The rounds the run was launched for: its overrides, else its exported run config."""
    for name in OVERRIDES_FILES:
        path = run_dir / name
        if path.exists():
            try:
                table = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError:
                continue
            value = table.get("num-rounds", table.get("num_rounds"))
            if isinstance(value, int):
                return value
    cfg = _read_json(run_dir / "final" / "run-config.json")
    if isinstance(cfg, dict) and isinstance(cfg.get("num-rounds"), int):
        return int(cfg["num-rounds"])
    return None


@dataclass
class RunInfo:
    """One run as its folder tells it."""

    name: str
    folder: Path
    status: str
    started: datetime | None
    round: int | None  # the last round written (0: only the untrained adapter's evaluation)
    planned: int | None
    flower_ids: list[int] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)  # the last row's "global" metrics
    max_epsilon: float | None = None  # the largest ε a merchant reported in the last row
    error: str = ""  # failure.json's error

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "folder": str(self.folder),
            "status": self.status,
            "started": self.started.isoformat(timespec="seconds") if self.started else None,
            "round": self.round,
            "planned_rounds": self.planned,
            "flower_run_ids": self.flower_ids,
            "global": self.last,
            "max_epsilon": self.max_epsilon,
            **({"error": self.error} if self.error else {}),
        }


def _started(run_dir: Path, launches: list[dict[str, Any]], rows: list[dict[str, Any]]) -> datetime | None:
    """When the run began: its first launch; else the metrics file's last write less its time."""
    for launch in launches:
        try:
            when = datetime.fromisoformat(str(launch["submitted"]))
        except (KeyError, ValueError):
            continue
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    metrics = run_dir / METRICS_FILE
    if rows and metrics.exists():
        elapsed = rows[-1].get("time_s")
        seconds = float(elapsed) if isinstance(elapsed, (int, float)) else 0.0
        return datetime.fromtimestamp(metrics.stat().st_mtime - seconds, timezone.utc)
    try:
        return datetime.fromtimestamp(run_dir.stat().st_mtime, timezone.utc)
    except OSError:
        return None


def run_info(run_dir: Path) -> RunInfo:
    rows = read_rows(run_dir)
    launches = _read_json(run_dir / LAUNCHES_FILE)
    launches = [x for x in launches if isinstance(x, dict)] if isinstance(launches, list) else []
    failure = _read_json(run_dir / FAILURE_FILE)
    if isinstance(failure, dict):
        status = "failed"
    elif (run_dir / "final").is_dir():
        status = "finished"
    elif rows:
        status = "unfinished"
    else:
        status = "submitted" if launches else "empty"
    last = rows[-1] if rows else {}
    eps = [
        m["epsilon"]
        for m in dict(last.get("merchants") or {}).values()
        if isinstance(m, dict) and isinstance(m.get("epsilon"), (int, float))
    ]
    ids = [int(x["flower-run-id"]) for x in launches if isinstance(x.get("flower-run-id"), int)]
    return RunInfo(
        name=run_dir.name,
        folder=run_dir,
        status=status,
        started=_started(run_dir, launches, rows),
        round=last.get("round") if rows else None,
        planned=planned_rounds(run_dir),
        flower_ids=ids,
        last=dict(last.get("global") or {}),
        max_epsilon=max(eps) if eps else None,
        error=str(failure.get("error", "")) if isinstance(failure, dict) else "",
    )


def list_runs(runs: Path) -> list[RunInfo]:
    """Every run in `runs`, oldest first (the latest at the bottom, as `ls -tr`)."""
    far_past = datetime.min.replace(tzinfo=timezone.utc)
    return sorted((run_info(p) for p in run_folders(runs)), key=lambda r: (r.started or far_past, r.name))


# ------------------------------------------------------------------------------------- printing


def metrics_summary(global_metrics: dict[str, Any]) -> str:
    """The pooled metrics as the coordinator's report words them (`server.metrics.describe_metrics`),
    each with its DP noise's sd, those the noise swamps named together at the end:
    `AUC 0.710 ± 0.040; loss 0.500; examples 120; unreadable: accuracy, macro-F1` (`coordinator log`
    and `fedbehavior report` say why)."""
    from server.metrics import describe_metrics

    readable, unreadable = [], []
    for text in describe_metrics(global_metrics):
        name, _, rest = text.partition(" unreadable")
        if rest or text.endswith(" unreadable"):
            unreadable.append(name)
        else:
            readable.append(text)
    if unreadable:
        readable.append("unreadable: " + ", ".join(unreadable))
    return "; ".join(readable) or "-"


def runs_table(runs: list[RunInfo]) -> list[str]:
    lines = [f"{'run':<28} {'started (UTC)':<16} {'status':<10} {'rounds':>7} {'max ε':>6}  last metrics"]
    for r in runs:
        started = r.started.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M") if r.started else "-"
        done = "-" if r.round is None else str(r.round)
        rounds = f"{done}/{r.planned}" if r.planned is not None else done
        eps = f"{r.max_epsilon:.2f}" if r.max_epsilon is not None else "-"
        lines.append(
            f"{r.name:<28} {started:<16} {r.status:<10} {rounds:>7} {eps:>6}  {metrics_summary(r.last)}"
        )
        if r.error:
            lines.append(f"{'':<28} {r.error}")
    return lines


def _row_lines(rows: list[dict[str, Any]], *, as_json: bool, header: bool) -> list[str]:
    if as_json:
        return [json.dumps(row, ensure_ascii=False) for row in rows]
    from server.metrics import format_row
    from server.metrics import header as table_header

    return ([table_header()] if header else []) + [format_row(row) for row in rows]


def _ending(run_dir: Path) -> str:
    info = run_info(run_dir)
    if info.status == "failed":
        return f"run {info.name} failed: {info.error}"
    if info.status == "finished":
        return f"run {info.name} finished: model in {run_dir / 'final'}"
    return ""


def print_log(run_dir: Path, out: TextIO, *, as_json: bool = False) -> None:
    """Every round's row of the run (the coordinator's console table, or the JSON rows), then how the
    run ended if it did."""
    rows = read_rows(run_dir)
    for line in _row_lines(rows, as_json=as_json, header=True):
        print(line, file=out)
    if not rows:
        print(f"no rounds written yet in {run_dir / METRICS_FILE}", file=sys.stderr)
    ending = _ending(run_dir)
    if ending and not as_json:
        print(ending, file=out)


def follow(
    run_dir: Path,
    out: TextIO,
    *,
    as_json: bool = False,
    interval: float = 2.0,
    timeout: float | None = None,
) -> Iterator[int]:
    """Print rows as they are written until the run finishes or fails (or `timeout` seconds pass);
    yields the number of rows printed after each look, so a caller (or a test) can stop it."""
    printed = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ended = _ending(run_dir)  # read before the rows: a run that ends between the two is not cut
        rows = read_rows(run_dir)
        new = rows[printed:]
        for line in _row_lines(new, as_json=as_json, header=printed == 0 and bool(new)):
            print(line, file=out, flush=True)
        printed += len(new)
        yield printed
        if ended:
            if not as_json:
                print(ended, file=out, flush=True)
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        time.sleep(interval)
