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
    body = "import os\n\ndef f():\n    from client.ingest.data import load_events\n    import server.app\n"
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


def _module_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports anywhere (functions and TYPE_CHECKING too: a
    circle is a design knot even when Python's lazy imports let it run)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        return next(
            (".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None
        )

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(resolve(f"{node.module}.{alias.name}") for alias in node.names)
        # a package's __init__ runs before its submodules: package → own submodule is not a circle
        graph[name] = {m for m in found if m and m != name and not m.startswith(name + ".")}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_the_circle_finder_finds_a_circle() -> None:
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others() -> None:
    graph = _module_graph()
    assert {
        "client.training.loop",
        "client.ingest.encoded",
        "shared.candidates",
        "client.ingest.peek",
    } <= set(graph)
    assert import_circles(graph) == []


# client/ is laid out by the merchant's jobs. A room imports only the rooms below it (and
# client.settings, the merchant's own merchant.toml); the edges (app, cli, merchant) sit on top.
CLIENT_ROOMS: dict[str, set[str]] = {
    "client.ingest": set(),
    "client.training": {"client.ingest"},
    "client.evaluation": {"client.ingest", "client.training"},
    "client.serving": {"client.ingest", "client.training", "client.evaluation"},
    "client.daemon": set(),
}
CLIENT_TOP = {"client", "client.app", "client.cli", "client.merchant", "client.settings"}


def _room(module: str) -> str:
    return next((room for room in CLIENT_ROOMS if module == room or module.startswith(room + ".")), module)


def test_client_is_laid_out_in_rooms_with_a_docstring_each() -> None:
    rooms = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "client").glob("*/__init__.py")
    }
    assert rooms == set(CLIENT_ROOMS)
    for room in rooms:
        init = ROOT / room.replace(".", "/") / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and doc.strip(), f"{init} has no docstring saying what the room is for"
    loose = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "client").glob("*.py")
    }
    assert loose == CLIENT_TOP, "a module at client/'s top belongs in one of the rooms"


def test_each_client_room_imports_only_the_rooms_below_it() -> None:
    graph = _module_graph()
    offenders = []
    for module, imports in graph.items():
        room = _room(module)
        if room not in CLIENT_ROOMS:
            continue
        allowed = CLIENT_ROOMS[room] | {room, "client.settings"}
        for target in imports:
            if target.startswith("client") and _room(target) not in allowed:
                offenders.append(f"{module} → {target}")
    assert not offenders, offenders


def test_every_package_is_installed() -> None:
    """A package missing from pyproject's list works in the editable checkout and breaks a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found == listed
