"""The merchant's SuperNode process: Flower's `flower-supernode` that runs only apps the merchant approved.

`fedbehavior merchant start` runs `python -I -m client.supernode --merchant-dir DIR <flower-supernode
arguments, --trusted-entities included>`. This module is the merchant's own installed code (never
part of a FAB; `-I` keeps the working folder off `sys.path`). Before Flower's SuperNode starts, it
wraps the connection's `get_fab` so that every FAB fetched from the coordinator carries the merchant's
stored approval for exactly those bytes, or none. Flower's own `--trusted-entities` check then verifies
the Ed25519 signature over sha256(content) and either runs the app or answers the run with an error,
executing nothing of it. If the wrapper cannot be installed the SuperNode does not start; had it been
skipped anyway, Flower would refuse every FAB (no verification entry at all), so it fails closed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from client.trust import KEY_ID, VALID_LICENSE, TrustStore

log = logging.getLogger("flwr")  # Flower's logger: the refusal lands in the SuperNode log, formatted alike

REFUSED = {VALID_LICENSE: "Valid"}  # lets Flower's check run; with no trusted signature it refuses the FAB


def approved_verifications(store: TrustStore, fab_hash: str, content: bytes, run_id: int) -> dict[str, str]:
    """The verifications to attach to a fetched FAB; logs why a FAB is refused."""
    digest = hashlib.sha256(content).hexdigest()
    try:
        verifications = store.verifications(content)
    except Exception as err:  # a broken approvals file refuses everything rather than crashing the node
        log.error("Refusing run %s: cannot read %s (%s)", run_id, store.approvals_path, err)
        return dict(REFUSED)
    if KEY_ID not in verifications:
        log.error(
            "Refusing run %s: its app (FAB sha256 %s, %d bytes) is not an app this merchant approved; "
            "none of its code runs and no data is sent. To allow it, review it with "
            "`fedbehavior merchant trust <app folder or .fab>`",
            run_id,
            digest,
            len(content),
        )
        return dict(REFUSED)
    if fab_hash != digest:  # stored under the name the coordinator gave: names and bytes must agree
        log.error(
            "Refusing run %s: the coordinator calls FAB %s what has sha256 %s", run_id, fab_hash, digest
        )
        return dict(REFUSED)
    log.info("Run %s: app %s is approved by this merchant", run_id, digest[:16])
    return verifications


def approving(get_fab: Callable[[str, int], Any], store: TrustStore) -> Callable[[str, int], Any]:
    """`get_fab` whose FABs carry this merchant's approval (or none) instead of what the SuperLink sent."""
    from flwr.supercore.fab import Fab

    def get_fab_with_approval(fab_hash: str, run_id: int) -> Fab:
        fab = get_fab(fab_hash, run_id)
        verifications = approved_verifications(store, fab.hash_str, fab.content, run_id)
        return Fab(fab.hash_str, fab.content, verifications)

    get_fab_with_approval.__name__ = "get_fab"
    return get_fab_with_approval


def install(store: TrustStore) -> None:
    """Wrap the `get_fab` of every SuperLink connection Flower's SuperNode opens."""
    from flwr.supernode import start_client_internal as flower

    original = getattr(flower, "_init_connection", None)
    if original is None:
        raise SystemExit(
            "this Flower version has no supernode.start_client_internal._init_connection: fedbehavior's "
            "app-approval check cannot be installed, so the SuperNode is not started; install flwr==1.41.0"
        )

    @contextlib.contextmanager
    def connection(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        with original(*args, **kwargs) as conn:
            parts = list(conn)
            where = [i for i, part in enumerate(parts) if getattr(part, "__name__", "") == "get_fab"]
            if len(where) != 1:
                raise RuntimeError(
                    "Flower's SuperLink connection has no single `get_fab`: the app-approval check cannot "
                    "be installed, so the SuperNode stops; install flwr==1.41.0"
                )
            parts[where[0]] = approving(parts[where[0]], store)
            yield tuple(parts)

    flower._init_connection = connection  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    """Parse `--merchant-dir`, install the approval check, hand the other arguments to Flower."""
    parser = argparse.ArgumentParser(prog="python -m client.supernode", add_help=False)
    parser.add_argument("--merchant-dir", required=True)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "--trusted-entities" not in rest:
        raise SystemExit(
            "--trusted-entities is missing: without it Flower runs any app; start the SuperNode with "
            "`fedbehavior merchant start`"
        )
    install(TrustStore(Path(known.merchant_dir)))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
