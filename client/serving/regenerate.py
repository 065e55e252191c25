"""Rebuild the committed gRPC code from `scorer.proto` with the pinned grpcio-tools.

    python -m client.serving.regenerate          # rewrite scorer_pb2.py, scorer_pb2_grpc.py, scorer_pb2.pyi
    python -m client.serving.regenerate --check  # exit 1 if the committed files differ from a fresh build

The proto is compiled from the repository root (`-I .`), so the generated stub imports
`client.serving.scorer_pb2` by its package path and the descriptor is named
`client/serving/scorer.proto`; the proto package (what clients call) is `fedbehavior.v1`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import metadata
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.81.1"
"""The grpcio-tools the committed code was generated with (pinned in pyproject's dev extra)."""
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROTO = "client/serving/scorer.proto"
GENERATED = ("scorer_pb2.py", "scorer_pb2_grpc.py", "scorer_pb2.pyi")


def generate(out: Path) -> dict[str, bytes]:
    """Compile the proto into `out` (a scratch folder) and return the generated files by name."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise RuntimeError(
            f"grpcio-tools is not installed; pip install grpcio-tools=={GRPCIO_TOOLS_VERSION} (dev extra)"
        ) from None
    found = metadata.version("grpcio-tools")
    if found != GRPCIO_TOOLS_VERSION:
        raise RuntimeError(
            f"grpcio-tools {found} is installed but the code is pinned to {GRPCIO_TOOLS_VERSION}; "
            f"pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}, or change the pin here and in pyproject"
        )
    include = Path(protoc.__file__).parent / "_proto"  # the well-known types shipped with the tools
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    built = out / "client" / "serving"
    return {name: (built / name).read_bytes() for name in GENERATED}


def stale() -> list[str]:
    """Generated files whose committed text differs from a fresh build (empty: up to date)."""
    with tempfile.TemporaryDirectory(prefix="fedbehavior-protoc-") as tmp:
        fresh = generate(Path(tmp))
    return [n for n, data in fresh.items() if not (HERE / n).exists() or (HERE / n).read_bytes() != data]


def main(argv: list[str] | None = None) -> int:
    """Regenerate (default) or `--check` the committed code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for name in old:
            print(f"out of date: client/serving/{name} (run python -m client.serving.regenerate)")
        return 1 if old else 0
    with tempfile.TemporaryDirectory(prefix="fedbehavior-protoc-") as tmp:
        for name, data in generate(Path(tmp)).items():
            (HERE / name).write_bytes(data)
            print(f"wrote client/serving/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
