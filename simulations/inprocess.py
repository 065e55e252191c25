"""A federation in one process: the coordinator's messages go straight to each merchant's ClientApp
functions and the replies back through the server's decoder, with no SuperLink, Ray or network.

Everything a deployed round runs still runs (the ClientApp's decoding, the merchant's ledger and
DP-SGD, the outgoing guard, the reply encoding, the server's reply checks, aggregation, metrics);
only the transport is left out. Studies use it because it is several times faster than the Ray
simulation on a small machine and deterministic in its order of merchants.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context, Message, Metadata, RecordDict

import client.app as client_app
from server.app import decode_reply
from server.coordinator import Coordinator, Reply
from shared import protocol
from shared.adapters import AdapterState
from shared.config import RunConfig


class InProcessFederation:
    """Merchant folders as nodes 1..n; `train`/`evaluate` call the ClientApp handlers in turn."""

    def __init__(self, merchant_dirs: Sequence[Path], run_key: str) -> None:
        self.dirs = [Path(d).resolve() for d in merchant_dirs]
        self.run_key = run_key
        self._sent = 0

    def node_ids(self, minimum: int) -> list[int]:
        if len(self.dirs) < minimum:
            raise ValueError(f"{len(self.dirs)} merchant folders, but min-available-nodes is {minimum}")
        return list(range(1, len(self.dirs) + 1))

    def _context(self, node: int) -> Context:
        folder = self.dirs[node - 1]
        # the folder's own settings (merchant.toml, or a simulated merchant's merchant.json: its budget,
        # delta and accountant); a bare data folder gets the defaults
        node_config: dict[str, bool | float | int | str] = {"merchant-dir": str(folder)}
        if not any((folder / name).is_file() for name in ("merchant.toml", "merchant.json")):
            node_config = {"data-dir": str(folder), "merchant-id": folder.name}
        return Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={})

    def _request(self, kind: str, node: int, adapter: AdapterState, cfg: RunConfig, rnd: int) -> Message:
        self._sent += 1
        content = protocol.encode_request(
            protocol.Request(cfg.plan_record(), rnd, self.run_key, dict(adapter))
        )
        metadata = Metadata(
            run_id=1,
            message_id=f"m{self._sent}",
            src_node_id=0,
            dst_node_id=node,
            reply_to_message_id="",
            group_id=str(rnd),
            created_at=time.time(),
            ttl=86_400.0,
            message_type=kind,
        )
        return Message(content, metadata=metadata)  # type: ignore[call-overload]

    def _round_trip(
        self, kind: str, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, rnd: int
    ) -> list[Reply]:
        handler = client_app.train if kind == "train" else client_app.evaluate
        replies = []
        for node in nodes:
            reply = handler(self._request(kind, node, adapter, cfg, rnd), self._context(node))
            replies.append(decode_reply(node, reply, kind))
        return replies

    def train(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        return self._round_trip("train", nodes, adapter, cfg, server_round)

    def evaluate(
        self, nodes: Sequence[int], adapter: AdapterState, cfg: RunConfig, server_round: int
    ) -> list[Reply]:
        return self._round_trip("evaluate", nodes, adapter, cfg, server_round)


def run_in_process(
    cfg: RunConfig, merchant_dirs: Sequence[Path], run_dir: Path, *, console: bool = False
) -> Path:
    """Run `cfg` over the merchant folders in this process; the run folder as a Flower run writes it."""
    federation = InProcessFederation(merchant_dirs, run_key=run_dir.name)
    return Coordinator(cfg, federation, run_dir, console=console).run()
