"""The documentation: the generated configuration reference is current and complete, the README stays
short and reaches every page of the site, and the documented scoring client runs from the `.proto` alone."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from simulations import config_reference as ref

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PROJECT_PACKAGES = {"shared", "client", "server", "simulations", "tests"}


def _tables() -> Iterator[tuple[str, set[str]]]:
    """(title, its keys) for every table the reference renders."""
    for section in ref.SECTIONS:
        yield section.title, {f"`{ref.key_of(name, info)}`" for name, info in section.fields()}
        for name, info, nested in ref.nested_models(section.model):
            keys = {f"`{ref.key_of(n, i)}`" for n, i in ref.leaf_fields(nested)}
            yield f"`[{ref.key_of(name, info)}]`", keys


def _section_text(page: str, title: str) -> str:
    """The text under the heading `title` up to the next heading of any level."""
    found = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", page, re.M | re.S)
    assert found, f"no section {title!r} in the configuration reference"
    return found.group(1)


def test_configuration_reference_is_current() -> None:
    committed = ref.PAGE.read_text(encoding="utf-8")
    assert committed == ref.render(), "run: python -m simulations.config_reference"


def test_every_key_of_every_model_is_in_its_table() -> None:
    page = ref.PAGE.read_text(encoding="utf-8")
    for title, keys in _tables():
        section = _section_text(page, title)
        rows = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| `")}
        assert rows == keys, title
    run_config = [
        line
        for title in (
            "Run config: the plan every merchant receives",
            "Run config: the coordinator's own keys",
        )
        for line in _section_text(page, title).splitlines()
        if line.startswith("| `")
    ]
    assert len(run_config) == len(ref.RunConfig.model_fields)
    plan = _section_text(page, "Run config: the plan every merchant receives")
    assert "`aggregation`" not in plan and "`sim-root`" not in plan and "`task`" in plan


def test_every_run_config_key_is_described() -> None:
    missing = [name for name, info in ref.RunConfig.model_fields.items() if not info.description]
    assert not missing, f"RunConfig fields without a description: {missing}"


def test_supplements_only_fill_missing_descriptions() -> None:
    for (model, name), text in ref.SUPPLEMENT.items():
        assert name in model.model_fields, f"{model.__name__}.{name} is gone: drop its supplement"
        assert not model.model_fields[name].description, (
            f"{model.__name__}.{name} now describes itself: drop its supplement ({text!r})"
        )


def test_validated_choices_are_enforced() -> None:
    for (model, name), choices in ref.VALIDATED_CHOICES.items():
        key = ref.key_of(name, model.model_fields[name])
        assert "no-such-choice" not in choices
        with pytest.raises(ValueError, match=key):
            model.model_validate({key: "no-such-choice"})


def test_allowed_values_show_choices_and_bounds() -> None:
    fields = ref.RunConfig.model_fields
    assert ref.allowed_values(ref.RunConfig, "trainable", fields["trainable"]) == "one of `head`, `lora+head`"
    assert ref.allowed_values(ref.RunConfig, "num_rounds", fields["num_rounds"]) == "≥ 1; ≤ 1000"
    assert "`repeat-purchase`" in ref.allowed_values(ref.RunConfig, "task", fields["task"])


def test_main_check_reports_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ref, "ROOT", tmp_path)
    monkeypatch.setattr(ref, "PAGE", tmp_path / "docs" / "reference" / "configuration.md")
    assert ref.main(["--check"]) == 1
    assert ref.main([]) == 0
    assert ref.main(["--check"]) == 0


def _nav_pages() -> list[str]:
    """Every page in mkdocs.yml's nav."""
    import yaml  # PyYAML, which mkdocs needs

    def pages(entries: object) -> Iterator[str]:
        if isinstance(entries, str):
            yield entries
        elif isinstance(entries, list):
            for entry in entries:
                yield from pages(entry)
        elif isinstance(entries, dict):
            for value in entries.values():
                yield from pages(value)

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return list(pages(config["nav"]))


def test_every_page_is_in_the_nav_and_exists() -> None:
    nav = _nav_pages()
    assert "reference/configuration.md" in nav and "guides/scoring-client.md" in nav
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == on_disk


def test_readme_is_short_and_reaches_every_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    links = set(re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text))
    for link in links:
        assert (ROOT / link).exists(), link
    unreached = [p for p in _nav_pages() if p != "index.md" and f"docs/{p}" not in links]
    assert not unreached, f"README links to none of {unreached}"


def test_quickstart_is_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Quickstart\n\n```bash\n(.*?)```", text, re.S)
    assert block
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_images_are_referenced() -> None:
    pages = "".join(p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md"))
    for image in ("report.png", "utility-eps.png"):
        assert (DOCS / image).exists() and image in pages


# --- the documented scoring client, from the proto alone ---

CLIENT = DOCS / "examples" / "score_client.py"
PROTO = ROOT / "client" / "serving" / "scorer.proto"


def test_the_scoring_client_imports_nothing_of_ours() -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(CLIENT.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & PROJECT_PACKAGES
    assert {"grpc", "scorer_pb2", "scorer_pb2_grpc"} <= imported
    page = (DOCS / "guides" / "scoring-client.md").read_text(encoding="utf-8")
    assert '--8<-- "client/serving/scorer.proto"' in page
    assert '--8<-- "docs/examples/score_client.py"' in page


def test_the_scoring_client_runs_from_a_folder_of_its_own(tiny_bert: str, tmp_path: Path) -> None:
    from client.serving import scorer_pb2, scorer_pb2_grpc  # the project's own stubs, to compare
    from client.serving.service import ServeOptions, start_server
    from tests.trained_run import make_run

    caller = tmp_path / "shop"  # a caller's folder, outside the checkout, with a client.py of its own
    caller.mkdir()
    (caller / "client.py").write_text("raise ImportError('the caller imported its own client.py')\n")
    shutil.copy(PROTO, caller / "scorer.proto")
    shutil.copy(CLIENT, caller / "score_client.py")
    protoc = [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=."]
    subprocess.run([*protoc, "scorer.proto"], cwd=caller, check=True, timeout=120)
    generated = (caller / "scorer_pb2_grpc.py").read_text()
    assert "import scorer_pb2" in generated and "client.serving" not in generated

    # the request the client sends, as bytes on the wire
    dump = "import score_client; print(score_client.request().SerializeToString().hex())"
    wire = subprocess.run(
        [sys.executable, "-c", dump],
        cwd=caller, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()  # fmt: skip

    server = start_server(make_run(tmp_path / "run", tiny_bert) / "final", ServeOptions(port=0))
    try:
        done = subprocess.run(
            [sys.executable, "score_client.py", f"127.0.0.1:{server.port}"],
            cwd=caller, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        # the same bytes through the project's own stubs
        request = scorer_pb2.ScoreRequest.FromString(bytes.fromhex(wire))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            expected = scorer_pb2_grpc.ScorerStub(channel).Score(request, timeout=30)
    finally:
        server.stop(1.0)
    assert done.returncode == 0, done.stderr
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["customer_id"], r["session_id"]) for r in printed] == [("c1", "s1"), ("c1", "s2")]
    for row, score in zip(printed, expected.scores, strict=True):
        assert (row["customer_id"], row["session_id"], row["label"]) == (
            score.customer_id, score.session_id, score.label,
        )  # fmt: skip
        assert row["probabilities"] == {p.label: p.probability for p in score.probabilities}
        assert set(row["probabilities"]) == {"no-buy", "buy"}
