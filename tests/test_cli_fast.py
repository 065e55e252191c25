"""The command line answers at once: building it imports no heavy library, `--version`, defaults in
every help, `--home` before or after the coordinator's command, `merchant trust MERCHANT_DIR APP`
(and its older spelling), `coordinator runs` / `coordinator log` on a run folder written by hand.

The light parsers of `client.cli` / `server.cli` repeat the flags of commands whose modules import
torch; `test_light_parsers_match_the_commands_own` keeps the two equal."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from shared.cli import DefaultsHelpFormatter, build_parser, informative_default, main, subparsers_of

ROOT = Path(__file__).resolve().parent.parent
HEAVY = (
    "torch",
    "transformers",
    "flwr",
    "peft",
    "opacus",
    "numpy",
    "pyarrow",
    "pandas",
    "pydantic",
    "pydantic_settings",
    "grpc",
    "matplotlib",
    "sklearn",
)


def test_building_the_parser_imports_no_heavy_library() -> None:
    """Deterministic where timing is not: a fresh interpreter builds the whole parser, then lists the
    heavy packages it has loaded (none: each command imports them when it runs)."""
    code = (
        "import json, sys\n"
        "import shared.cli\n"
        "shared.cli.build_parser()\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
    )
    assert json.loads(done.stdout) == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedbehavior {version('fedbehavior')}"


def parse(*argv: str) -> dict[str, Any]:
    return vars(build_parser().parse_args(list(argv)))


def test_home_before_or_after_the_coordinator_command(tmp_path: Path) -> None:
    home = str(tmp_path / "c")
    for command in (["start", "--insecure"], ["runs"], ["log", "run-1"], ["build"], ["status", "--json"]):
        before = parse("coordinator", "--home", home, *command)
        after = parse("coordinator", command[0], "--home", home, *command[1:])
        assert before == after and before["home"] == home
    assert "home" not in parse("coordinator", "runs")  # no --home: the default folder
    assert parse("coordinator", "--home", "a", "runs", "--home", "b")["home"] == "b"  # the last one


def test_old_top_level_spellings_still_parse_but_are_not_listed() -> None:
    parser = build_parser()
    for old, new in (("predict", "merchant"), ("serve", "merchant"), ("export", "coordinator")):
        args = {"predict": ["--model", "m", "--events", "e", "--out", "o.csv"], "serve": ["--model", "m"]}
        rest = args.get(old, ["runs/x", "--out", "o"])
        old_args = vars(parser.parse_args([old, *rest]))
        new_args = vars(parser.parse_args([new, old, *rest]))
        assert old_args["func"].__name__ == new_args["func"].__name__
        assert {k: v for k, v in old_args.items() if k not in ("func", "command")} == {
            k: v for k, v in new_args.items() if k not in ("func", "command", f"{new}_command")
        }
    assert parse("report", "runs/x", "--tensorboard")["tensorboard"] is True
    listing = parser.format_help()
    for old in ("predict", "serve", "export", "report"):
        assert f"\n    {old} " not in listing
    for group in ("simulate", "merchant", "coordinator"):
        assert f"\n    {group} " in listing


def test_every_option_with_a_default_shows_it() -> None:
    missing = []
    for parser in subparsers_of(build_parser()):
        assert issubclass(parser.formatter_class, DefaultsHelpFormatter), parser.prog
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._StoreConstAction) or not informative_default(action.default):
                continue
            text = formatter._get_help_string(action) or ""  # type: ignore[attr-defined]
            if "default" not in text:
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing
    help_text = next(
        p for p in subparsers_of(build_parser()) if p.prog.endswith("merchant personalise")
    ).format_help()
    assert "(default: 20)" in help_text and "(default: head)" in help_text


# ------------------------------------------------------------------------------------------ trust


def test_trust_takes_the_merchant_folder_first_and_keeps_merchant_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.cli import trust_folders
    from client.daemon.control import init_merchant
    from tests.deploy_helpers import write_rogue_app

    folder = tmp_path / "m"
    init_merchant(folder, merchant_id="m", superlink="h:1", root_certificates=None, insecure=True)
    app = write_rogue_app(tmp_path / "rogue")

    def folders(*argv: str) -> tuple[Path, str]:
        return trust_folders(build_parser().parse_args(["merchant", "trust", *argv]))

    assert folders(str(folder), str(app)) == (folder, str(app))
    assert folders(str(app), "--merchant-dir", str(folder)) == (folder, str(app))
    assert "--merchant-dir is deprecated" in capsys.readouterr().err
    assert folders(str(folder), "--list") == (folder, "")
    assert folders(str(folder)) == (folder, "")  # a merchant folder alone: nothing to approve yet
    assert folders(str(app)) == (Path("."), str(app))  # the old `trust APP` inside the merchant folder
    with pytest.raises(ValueError, match="two merchant folders"):
        folders(str(folder), str(app), "--merchant-dir", str(folder))

    assert main(["merchant", "trust", str(folder), str(app), "--yes"]) == 0
    approved = capsys.readouterr().out
    assert "approved rogue/rogueapp==1.0.0" in approved
    assert main(["merchant", "trust", str(folder), "--list"]) == 0
    listed = capsys.readouterr().out
    assert main(["merchant", "trust", "--list", "--merchant-dir", str(folder)]) == 0
    assert capsys.readouterr().out == listed and "rogueapp" in listed
    monkeypatch.chdir(folder)
    assert main(["merchant", "trust", "--list"]) == 0  # no folder: here
    assert capsys.readouterr().out == listed
    assert main(["merchant", "trust", str(tmp_path / "nothere"), str(app), "--yes"]) == 2
    assert "no merchant.toml" in capsys.readouterr().err


# ----------------------------------------------------------------------- coordinator runs and log


def row(n: int, auc: float | None, *, eps: float, status: str = "trained") -> dict[str, Any]:
    """A metrics.jsonl row as the contract in server/metrics.py and DESIGN.md has it."""
    merchant = {
        "status": "evaluated" if n == 0 else status,
        "epsilon": eps,
        "delta": 1e-6,
        "examples": 400,
        "bytes_up": 0 if n == 0 else 1000,
    }
    global_metrics: dict[str, Any] = {
        "accuracy": 0.7 + n / 100,
        "macro_f1": 0.6,
        "loss": 0.5,
        "examples": 120,
    }
    if auc is not None:
        global_metrics |= {"auc": auc, "noise_sd": {"auc": 0.04}}
    return {"round": n, "time_s": 10.0 * (n + 1), "global": global_metrics, "merchants": {"m1": merchant}}


def write_run(runs: Path, name: str, rows: list[dict[str, Any]], files: dict[str, Any]) -> Path:
    """A run folder: `metrics.jsonl` from `rows`, and `files` (None: a folder; str: text; else JSON)."""
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for file_name, content in files.items():
        path = folder / file_name
        if content is None:
            path.mkdir()
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return folder


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A coordinator folder with three runs: one going, one failed, one finished."""
    folder = tmp_path / "coord"
    runs = folder / "runs"
    write_run(
        runs,
        "run-a",
        [row(0, 0.5, eps=0.1), row(1, 0.62, eps=1.2), row(2, 0.71, eps=2.3)],
        {
            "launches.json": [
                {"flower-run-id": 7, "resume": False, "submitted": "2026-01-02T03:04:05+00:00"}
            ],
            "overrides.toml": 'num-rounds = 5\nrun-name = "run-a"\n',
        },
    )
    write_run(
        runs,
        "run-b",
        [row(0, None, eps=0.1)],
        {
            "failure.json": {"round": 1, "error": "round 1: no merchant produced a usable update"},
            "launches.json": [
                {"flower-run-id": 3, "resume": False, "submitted": "2026-01-01T00:00:00+00:00"}
            ],
        },
    )
    done = write_run(runs, "run-c", [row(0, 0.5, eps=0.1), row(1, 0.8, eps=1.0)], {"final": None})
    (done / "final" / "run-config.json").write_text(json.dumps({"num-rounds": 1}), encoding="utf-8")
    (runs / "not-a-run").mkdir()
    return folder


def test_coordinator_runs_lists_each_run_from_its_folder(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.runs import metrics_summary

    monkeypatch.delenv("FEDBEHAVIOR_COORDINATOR_RUNS_DIR", raising=False)
    assert main(["coordinator", "--home", str(home), "runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "started", "(UTC)"]
    by_name = {line.split()[0]: line for line in lines[1:] if line.startswith("run-")}
    assert list(by_name) == ["run-b", "run-a", "run-c"]  # oldest first: run-c's start is its files' time
    assert "2026-01-02 03:04" in by_name["run-a"] and " unfinished " in by_name["run-a"]
    assert (
        " 2/5 " in by_name["run-a"]
        and "AUC 0.710 ± 0.040" in by_name["run-a"]
        and " 2.30 " in by_name["run-a"]
    )
    assert " failed " in by_name["run-b"] and "no merchant produced a usable update" in "\n".join(lines)
    assert " finished " in by_name["run-c"] and " 1/1 " in by_name["run-c"]
    assert "not-a-run" not in "\n".join(lines)

    assert main(["coordinator", "runs", "--home", str(home), "--json", "--last", "2"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in listed] == ["run-a", "run-c"]
    assert listed[0]["flower_run_ids"] == [7] and listed[0]["round"] == 2 and listed[0]["planned_rounds"] == 5
    assert listed[0]["global"]["auc"] == 0.71 and listed[0]["status"] == "unfinished"

    noisy = {**row(2, 0.71, eps=2.3)["global"], "noise_sd": {"auc": 0.04, "accuracy": 0.3}}
    assert metrics_summary(noisy) == "macro-F1 0.600; AUC 0.710 ± 0.040; loss 0.500; examples 120; " + (
        "unreadable: accuracy"
    )  # the noise swamps accuracy: named, never printed as a number
    assert main(["coordinator", "runs", "--runs-dir", str(home / "elsewhere")]) == 0
    assert "no runs in" in capsys.readouterr().out


def test_coordinator_log_prints_the_rounds_and_how_the_run_ended(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.metrics import format_row, header

    monkeypatch.delenv("FEDBEHAVIOR_COORDINATOR_RUNS_DIR", raising=False)
    rows = [json.loads(x) for x in (home / "runs" / "run-a" / "metrics.jsonl").read_text().splitlines()]
    assert main(["coordinator", "--home", str(home), "log", "run-a"]) == 0
    assert capsys.readouterr().out == "\n".join([header(), *(format_row(r) for r in rows)]) + "\n"
    assert main(["coordinator", "log", str(home / "runs" / "run-a"), "--json"]) == 0  # a path works too
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == rows
    assert main(["coordinator", "log", "run-b", "--home", str(home)]) == 0
    assert "run run-b failed: round 1: no merchant" in capsys.readouterr().out
    assert main(["coordinator", "log", "run-c", "--home", str(home), "--follow"]) == 0  # ended: returns
    assert capsys.readouterr().out.splitlines()[-1].startswith("run run-c finished: model in ")
    assert main(["coordinator", "log", "run-x", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "no run 'run-x'" in err and "(runs: run-a, run-b, run-c)" in err


def test_follow_prints_rounds_as_they_land(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from server.runs import follow

    run = home / "runs" / "run-a"
    looks = follow(run, sys.stdout, interval=0)
    assert next(looks) == 3
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row(3, 0.75, eps=3.0)) + "\n" + '{"round": 4, "ti')  # a row half written
    assert next(looks) == 4
    (run / "metrics.jsonl").write_text(
        (run / "metrics.jsonl").read_text().rsplit("\n", 1)[0]
        + "\n"
        + json.dumps(row(4, 0.8, eps=3.5))
        + "\n"
    )
    (run / "final").mkdir()
    assert list(looks) == [5]  # the last row, then the end
    from server.metrics import header

    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(header().splitlines()) + 5 + 1 and out[-1].startswith("run run-a finished")


def test_runs_folder_is_the_coordinators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.deploy import CoordinatorHome
    from server.metrics import FAILURE_FILE
    from server.runs import FAILURE_FILE as failure_file
    from server.runs import runs_folder

    assert failure_file == FAILURE_FILE
    monkeypatch.delenv("FEDBEHAVIOR_COORDINATOR_RUNS_DIR", raising=False)
    home = tmp_path / "c"
    home.mkdir()
    assert runs_folder(home) == CoordinatorHome.open(home).runs == home / "runs"
    (home / "coordinator.toml").write_text('runs-dir = "../shared-runs"\n')
    assert runs_folder(home) == CoordinatorHome.open(home).runs == tmp_path / "shared-runs"
    monkeypatch.setenv("FEDBEHAVIOR_COORDINATOR_RUNS_DIR", str(tmp_path / "env-runs"))
    assert runs_folder(home) == CoordinatorHome.open(home).runs == tmp_path / "env-runs"
    monkeypatch.setenv("FEDBEHAVIOR_HOME", str(home))
    assert runs_folder(None) == CoordinatorHome.open(None).runs


# ------------------------------------------------------------ light parsers equal the commands' own


def options(parser: argparse.ArgumentParser) -> dict[str, tuple[Any, ...]]:
    """What a parser accepts: each argument's flags, destination, default, type, choices, count."""
    return {
        action.dest: (
            tuple(action.option_strings),
            action.default,
            action.type,
            tuple(action.choices) if action.choices else None,
            action.nargs,
            action.required,
            type(action).__name__,
        )
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
    }


def one_command(add: Any) -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser().add_subparsers()
    add(sub)
    return next(iter(sub.choices.values()))


def test_light_parsers_match_the_commands_own() -> None:
    """The flags `client.cli` and `server.cli` define (without importing a command's module: the one
    definition of each command's flags) agree with what the commands read: choices, defaults (e.g.
    PersonaliseSettings'), help texts."""
    import client.cli as light
    import server.cli as light_server
    from client.evaluation.fine_tune import TRAIN_MODES, PersonaliseSettings
    from client.ingest.formats import FORMATS
    from server.report import TENSORBOARD_DIR, TENSORBOARD_HINT

    assert light.INGEST_FORMATS == FORMATS and light.PERSONALISE_TRAIN == TRAIN_MODES
    assert PersonaliseSettings().train == "head"
    assert (
        TENSORBOARD_DIR in light_server.TENSORBOARD_HELP and TENSORBOARD_HINT in light_server.TENSORBOARD_HELP
    )
    # preview, predict and personalise are defined in client.cli alone: its defaults are the settings'
    personalise = one_command(light.add_personalise_cli)
    defaults = PersonaliseSettings()
    for action in personalise._actions:
        if hasattr(defaults, action.dest):
            assert action.default == getattr(defaults, action.dest), action.dest
    top = argparse.ArgumentParser().add_subparsers()
    light_server.add_run_output_cli(top, listed=False)
    export = top.choices["export"].parse_args(["runs/r", "--out", "x", "--adapter-only"])
    assert (export.run_dir, export.out, export.adapter_only) == ("runs/r", "x", True)
    assert top.choices["report"].parse_args(["runs/r", "--tensorboard"]).tensorboard


def test_the_installed_script_answers(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "fedbehavior"
    if not script.exists():
        pytest.skip("no fedbehavior script beside this interpreter")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, env=env, check=True
    )
    assert done.stdout.strip() == f"fedbehavior {version('fedbehavior')}"
    done = subprocess.run([str(script), "coordinator", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "runs" in done.stdout and "--home DIR" in done.stdout
