"""The package layering: shared/ at the bottom, client/ and server/ on it, simulations/ on top.

Every import is checked, including those inside functions (the project imports heavy modules lazily,
so a top-level scan alone would miss most of them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "client", "server", "simulations")
FORBIDDEN = {
    "shared": {"client", "server", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
    "simulations": set(),
}


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages that `path` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    body = "import os\n\ndef f():\n    from client.data import load_events\n    import server.app\n"
    module.write_text(body)
    assert imported_packages(module) == {"client", "server"}


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_the_layers_below(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    offenders = {path: found for path, found in offenders.items() if found}
    assert not offenders, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_every_package_registers_its_commands() -> None:
    from shared.cli import build_parser, registrars

    assert [name for name, _ in registrars()][:3] == ["simulations", "client", "server"]
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None
    for name in (
        "simulate",
        "split-store",
        "merchant",
        "predict",
        "serve",
        "coordinator",
        "export",
        "report",
    ):
        assert name in commands
