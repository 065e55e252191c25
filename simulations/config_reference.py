"""The configuration reference page, `docs/reference/configuration.md`, rendered from the pydantic models.

    python -m simulations.config_reference          # rewrite the page
    python -m simulations.config_reference --check  # exit 1 if the committed page differs from a fresh render

Every key of the run config (`shared.config.RunConfig`), the merchant's settings
(`client.settings.MerchantSettings` with its `[policy]` and `[daemon]` tables) and the coordinator's
(`server.deploy.CoordinatorSettings`) becomes a table row: the key as TOML spells it, its type, its
default, the values it accepts (`Literal` choices, a choice pattern, `Field` bounds) and its description.
Nothing is written by hand, so the page cannot drift from the code: `tests/test_docs.py` renders it
again and compares. It lives in `simulations/`, the one layer that may import both the merchant's and
the coordinator's packages.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, PlainSerializer
from pydantic.fields import FieldInfo

from client.settings import MerchantSettings
from server.deploy import CoordinatorSettings
from shared.config import MerchantPlan, RunConfig
from shared.tasks import TASK_NAMES

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reference" / "configuration.md"

VALIDATED_CHOICES: dict[tuple[type[BaseModel], str], tuple[str, ...]] = {
    # choices a field validator enforces, which the field's type does not show
    (RunConfig, "task"): TASK_NAMES,
}

SUPPLEMENT: dict[tuple[type[BaseModel], str], str] = {
    # descriptions of fields whose model gives none yet; each entry goes once the model has its own
    # (tests/test_docs.py says so)
    (MerchantSettings, "merchant_id"): "the merchant's name in its replies, its ledger and its logs",
    (MerchantSettings, "data_dir"): "folder of the merchant's data: `store/` (an ingest) or `events.jsonl`",
    (MerchantSettings, "state_dir"): "ledger, run book, evaluation log, quarantine and daemon logs",
    (MerchantSettings, "max_epsilon"): "the merchant's whole privacy budget: ε over every round of every "
    "run it takes part in, at `delta`",
    (MerchantSettings, "eval_fraction"): "share of customers held out for evaluation, drawn by a hash of "
    "the customer id",
    (CoordinatorSettings, "ssl_certfile"): "the SuperLink's TLS certificate",
    (CoordinatorSettings, "ssl_keyfile"): "the private key of `ssl-certfile`",
    (CoordinatorSettings, "ssl_ca_certfile"): "the CA certificate that signed `ssl-certfile` (merchants "
    "and the coordinator's CLI trust it)",
    (CoordinatorSettings, "database"): "the SuperLink's state: registered merchants, runs, messages",
    (CoordinatorSettings, "runs_dir"): "run folders: `metrics.jsonl`, `checkpoints/`, `final/`",
    (CoordinatorSettings, "start_timeout_s"): "seconds `coordinator start` waits for the SuperLink's port",
}


@dataclass(frozen=True)
class Section:
    title: str
    model: type[BaseModel]
    where: str
    """How a user sets these keys (Markdown)."""
    without: type[BaseModel] | None = None
    """A base model whose keys have a section of their own (the plan, for the coordinator's keys)."""

    def fields(self) -> list[tuple[str, FieldInfo]]:
        """The value-holding keys this section's table lists."""
        skip = set(self.without.model_fields) if self.without else set()
        return [(name, info) for name, info in leaf_fields(self.model) if name not in skip]


SECTIONS = (
    Section(
        "Run config: the plan every merchant receives",
        MerchantPlan,
        "The coordinator's experiment: `[tool.flwr.app.config]` in `pyproject.toml` (a test keeps it "
        "equal to the defaults below), `fedbehavior simulate --set key=value`, `fedbehavior coordinator "
        'run --set key=value` or `flwr run . --run-config "key=value"`. These keys are what every '
        "merchant receives each round (`shared.config.MerchantPlan`): it checks them against its own "
        "`[policy]` and pins them for the run. List keys are comma-separated strings.",
    ),
    Section(
        "Run config: the coordinator's own keys",
        RunConfig,
        "Set the same ways, read only by the coordinator (sampling, aggregation, the server optimizer, "
        "timeouts, where runs are written) or by the simulation that plays the merchants (`sim-*`). They "
        "never leave the coordinator (`plan_record()` is what is sent), so a merchant's plan does not "
        "depend on them.",
        without=MerchantPlan,
    ),
    Section(
        "Merchant settings",
        MerchantSettings,
        "The merchant's own, never the coordinator's: `merchant.toml` in the merchant folder (written by "
        "`fedbehavior merchant init`), `merchant.json` for a simulated merchant, or a SuperNode's node "
        "config. Relative paths are relative to the settings file's folder.",
    ),
    Section(
        "Coordinator settings",
        CoordinatorSettings,
        "`coordinator.toml` in the coordinator's home folder (`~/.fedbehavior`, or `--home`): how the "
        "SuperLink is started and how the coordinator's own CLI reaches it. Relative paths are relative to "
        "the home folder.",
    ),
)


def key_of(name: str, info: FieldInfo) -> str:
    """The key as TOML and `--set` spell it (kebab-case)."""
    return info.alias or name.replace("_", "-")


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without `None`, whether `None` was allowed)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return annotation, False


def type_name(annotation: Any) -> str:
    """A short reader's name of a field's type: int, float, str, bool, path, list of str, …"""
    inner, optional = _without_none(annotation)
    origin = get_origin(inner)
    if origin is Literal:
        name = "str" if all(isinstance(a, str) for a in get_args(inner)) else "value"
    elif origin in (tuple, list, set, frozenset):
        args = [a for a in get_args(inner) if a is not Ellipsis]
        name = "list of " + (type_name(args[0]) if args else "values")
    elif origin in (Union, types.UnionType):
        name = " or ".join(type_name(a) for a in get_args(inner))
    elif inner is Path or (inspect.isclass(inner) and issubclass(inner, Path)):
        name = "path"
    elif inspect.isclass(inner):
        name = inner.__name__
    else:
        name = str(inner)
    return f"{name} (optional)" if optional else name


def _choices_of_pattern(pattern: str) -> tuple[str, ...] | None:
    """`^(a|b\\+c)$` → ("a", "b+c"); None for any other pattern."""
    found = re.fullmatch(r"\^\(([^()]*)\)\$", pattern)
    if not found:
        return None
    return tuple(re.sub(r"\\(.)", r"\1", choice) for choice in found.group(1).split("|"))


def _number(value: Any) -> str:
    """A bound as a reader writes it: 0, 0.5, 1000, 1e+06."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _code(value: str) -> str:
    return f"`{value}`"


def allowed_values(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    """Choices and bounds the model enforces, as Markdown; "" when any value of the type will do."""
    parts: list[str] = []
    inner, _ = _without_none(info.annotation)
    each = ""
    if get_origin(inner) in (tuple, list, set, frozenset):
        each, inner = "each ", next((a for a in get_args(inner) if a is not Ellipsis), Any)
    choices: tuple[Any, ...] | None = None
    if get_origin(inner) is Literal:
        choices = get_args(inner)
    for meta in info.metadata:
        pattern = getattr(meta, "pattern", None)
        if isinstance(pattern, str):
            choices = _choices_of_pattern(pattern) or choices
            if _choices_of_pattern(pattern) is None:
                parts.append(f"matches {_code(pattern)}")
    choices = choices or VALIDATED_CHOICES.get((model, name))
    if choices:
        parts.insert(0, each + "one of " + ", ".join(_code(str(c)) for c in choices))
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Gt):
            parts.append(f"> {_number(meta.gt)}")
        elif isinstance(meta, annotated_types.Ge):
            parts.append(f"≥ {_number(meta.ge)}")
        elif isinstance(meta, annotated_types.Lt):
            parts.append(f"< {_number(meta.lt)}")
        elif isinstance(meta, annotated_types.Le):
            parts.append(f"≤ {_number(meta.le)}")
        elif isinstance(meta, annotated_types.MinLen):
            parts.append(f"length ≥ {meta.min_length}")
        elif isinstance(meta, annotated_types.MaxLen):
            parts.append(f"length ≤ {meta.max_length}")
    return "; ".join(parts)


def toml_value(value: Any) -> str:
    """A default as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value)
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def _comma_list(info: FieldInfo) -> bool:
    """A list key the run config carries as one comma-separated string (`shared.config.CommaList`)."""
    return any(isinstance(meta, PlainSerializer) for meta in info.metadata)


def default_of(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True, validated_data={})
    if _comma_list(info) and isinstance(value, (tuple, list)):
        value = ",".join(value)  # as TOML and `--set` write it
    if value is None:
        return "unset"
    return _code(toml_value(value))


def description_of(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    return info.description or SUPPLEMENT.get((model, name), "")


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: no pipes, no line breaks, no stray HTML."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def leaf_fields(model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo]]:
    """The fields of `model` that hold values (a nested model is a table of its own)."""
    for name, info in model.model_fields.items():
        if not _is_model(_without_none(info.annotation)[0]):
            yield name, info


def nested_models(model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo, type[BaseModel]]]:
    for name, info in model.model_fields.items():
        inner = _without_none(info.annotation)[0]
        if _is_model(inner):
            yield name, info, inner


def render_table(model: type[BaseModel], fields: Sequence[tuple[str, FieldInfo]] | None = None) -> list[str]:
    lines = ["| key | type | default | allowed values | description |", "|---|---|---|---|---|"]
    for name, info in leaf_fields(model) if fields is None else fields:
        row = (
            _code(key_of(name, info)),
            type_name(info.annotation) + (", comma-separated" if _comma_list(info) else ""),
            default_of(info),
            allowed_values(model, name, info),
            description_of(model, name, info),
        )
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def _doc(model: type[BaseModel]) -> str:
    text = inspect.cleandoc(model.__doc__ or "")
    return " ".join(text.split("\n\n")[0].split())


def _environment(settings: type[BaseModel], fields: type[BaseModel], path: Sequence[str]) -> str:
    """How environment variables name the keys of `fields` (a table `path` deep in `settings`)."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    if not prefix:
        return ""
    nested = str(settings.model_config.get("env_nested_delimiter") or "__")
    names = [name for name, _ in leaf_fields(fields)]
    numbers = [n for n, i in leaf_fields(fields) if _without_none(i.annotation)[0] in (int, float)]
    if not names:
        return ""
    example = prefix + nested.join([*path, (numbers or names)[0]]).upper()
    where = f", `{nested}` between the table and the key" if path else ""
    return (
        f"Environment variables override the file: `{prefix}` and the key in upper snake case{where} "
        f"(`{example}`)."
    )


def render_section(section: Section) -> list[str]:
    lines = [f"## {section.title}", "", section.where, ""]
    env = _environment(section.model, section.model, [])
    if env:
        lines += [env, ""]
    lines += render_table(section.model, section.fields())
    for name, info, nested in nested_models(section.model):
        lines += [
            "",
            f"### `[{key_of(name, info)}]`",
            "",
            _doc(nested) or description_of(section.model, name, info),
        ]
        env = _environment(section.model, nested, [name])
        lines += ["", env] if env else []
        lines += ["", *render_table(nested)]
    return lines


def render() -> str:
    """The whole page."""
    lines = [
        "<!-- generated by `python -m simulations.config_reference` from the pydantic models: do not edit "
        "(tests/test_docs.py keeps it current) -->",
        "",
        "# Configuration reference",
        "",
        "Every key of the three kinds of settings, rendered from the models that parse them. Keys are "
        "kebab-case, as TOML and `--set` spell them; a typo or a value outside the allowed ones is an error "
        "naming the key. Where each kind comes from and who decides it: [the configuration "
        "guide](../guides/configuration.md).",
    ]
    for section in SECTIONS:
        lines += ["", *render_section(section)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the page (default), or `--check` that the committed one is current."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report whether the page is out of date")
    args = parser.parse_args(argv)
    page = render()
    relative = PAGE.relative_to(ROOT)
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            print(f"out of date: {relative} (run python -m simulations.config_reference)")
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
