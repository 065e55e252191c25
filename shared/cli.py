"""`fedbehavior`: one command line composed of each package's own commands.

`shared/` is the bottom layer and imports nothing from `client/`, `server/` or `simulations/`. Each of
those registers its commands through the `fedbehavior.cli` entry-point group of the installed
distribution (`[project.entry-points."fedbehavior.cli"]` in pyproject.toml): a `register(subparsers)`
function per package. A merchant's install therefore carries the merchant's commands and the
coordinator's the coordinator's, composed here. Heavy imports happen inside each command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

COMMAND_GROUP = "fedbehavior.cli"
ORDER = ("simulations", "client", "server")
"""Entry-point names in the order their commands appear in `--help`; any others follow by name."""


def quiet_libraries() -> None:
    """Offline, no telemetry, no tokenizer threads warning, transformers errors only."""
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
    parser = argparse.ArgumentParser(prog="fedbehavior", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for _, register in registrars():
        register(sub)
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
