"""`fedbehavior`: one command line composed of each package's own commands.

`shared/` is the bottom layer and imports nothing from `client/`, `server/` or `simulations/`. Each of
those registers its commands through the `fedbehavior.cli` entry-point group of the installed
distribution (`[project.entry-points."fedbehavior.cli"]` in pyproject.toml): a `register(subparsers)`
function per package. A merchant's install therefore carries the merchant's commands and the
coordinator's the coordinator's, composed here.

Building the parser imports nothing heavier than argparse (no torch, transformers, flwr, pydantic
models): `fedbehavior --help` answers at once. Each registrar names its commands' functions with
`lazy("module", "function")`, which imports the module only when that command runs; a test
(`tests/test_cli_fast.py`) keeps it so.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

_PAIR = re.compile(r"\s*(?P<key>[^=:→]+?)\s*(?:=|->|→|:)\s*(?P<value>.+?)\s*$")


def parse_pairs(items: list[str] | str, what: str) -> dict[str, str]:
    """`a=b,c=d` (also `a->b`, `a→b`, `a:b`; repeated options add up) as a dict; `what` names the
    option in the error (a ValueError)."""
    texts = [items] if isinstance(items, str) else items
    out: dict[str, str] = {}
    for text in texts:
        for item in filter(str.strip, text.split(",")):
            match = _PAIR.match(item)
            if match is None:
                raise ValueError(f"{what}: {item.strip()!r} is not NAME=VALUE (e.g. product_view=view)")
            out[match["key"]] = match["value"]
    return out


COMMAND_GROUP = "fedbehavior.cli"
DISTRIBUTION = "fedbehavior"
ORDER = ("simulations", "client", "server")
"""Entry-point names in the order their commands appear in `--help`; any others follow by name."""

Command = Callable[[argparse.Namespace], int]


def quiet_libraries() -> None:
    """Offline, no telemetry, no tokenizer threads warning, transformers errors only.

    Imports transformers: call it only inside a command that loads a model anyway."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }.items():
        os.environ.setdefault(key, value)
    import transformers

    transformers.logging.set_verbosity_error()


def package_version() -> str:
    """The installed distribution's version (`fedbehavior --version`)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree on sys.path without `pip install -e .`
        from shared import __version__

        return f"{__version__} (not installed)"


def lazy(module: str, function: str) -> Command:
    """A command that imports `module` only when it runs, then calls its `function(args)`."""

    def command(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), function)(args))

    command.__name__ = command.__qualname__ = function
    command.__doc__ = f"`{module}.{function}`, imported when the command runs."
    return command


# ------------------------------------------------------------------------------------ help texts


def informative_default(default: Any) -> bool:
    """A default worth printing: not None, False, SUPPRESS, '' or an empty list."""
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    return not (isinstance(default, (str, list, tuple)) and len(default) == 0)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds `(default: …)` to every option whose default says something and whose help does not
    already name its default (as ArgumentDefaultsHelpFormatter does, without `default: None`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is None or text == argparse.SUPPRESS or "default" in text:
            return text
        if not informative_default(action.default) or isinstance(action, argparse._StoreConstAction):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class RawDescriptionDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (examples, tables), defaults added as above."""


def subparsers_of(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """`parser` and every parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for child in action.choices.values():
                if id(child) not in seen:  # an alias maps to the same parser
                    seen.add(id(child))
                    yield from subparsers_of(child)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every parser below `parser` prints its options' defaults in `--help` (one place for all)."""
    for p in subparsers_of(parser):
        base = p.formatter_class
        raw = isinstance(base, type) and issubclass(base, argparse.RawDescriptionHelpFormatter)
        p.formatter_class = RawDescriptionDefaultsHelpFormatter if raw else DefaultsHelpFormatter
        for action in p._actions:  # an option without a help text still shows its default
            if action.help is None and action.option_strings and informative_default(action.default):
                action.help = "(default: %(default)s)"


# ------------------------------------------------------------------------------------- the parser


def registrars() -> list[tuple[str, Callable[[Any], None]]]:
    """The installed packages' `register` functions, in `ORDER`."""
    found = {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}
    if not found:
        raise RuntimeError(
            f"no {COMMAND_GROUP} entry points: fedbehavior is not installed in this environment; "
            "run `make setup` (or `pip install -e .`) and call .venv/bin/fedbehavior"
        )
    rank = {name: i for i, name in enumerate(ORDER)}
    names = sorted(found, key=lambda n: (rank.get(n, len(ORDER)), n))
    return [(name, found[name].load()) for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbehavior",
        description="Federated fine-tuning of a shop-behaviour model under differential privacy: "
        "simulate it on one machine, or deploy it as merchants and a coordinator.",
        epilog="`fedbehavior COMMAND --help` describes each command and group "
        "(e.g. `fedbehavior merchant --help`, `fedbehavior merchant trust --help`).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {package_version()}", help="print the version"
    )
    # commands registered without a help text (old spellings kept working) stay out of the listing
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, register in registrars():
        register(sub)
    show_defaults(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for noisy in ("flwr", "ray", "opacus", "transformers", "peft", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except (ValueError, OSError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
