"""Neighbouring merchants and the coordinator's messages, for the privacy tests.

A merchant D (a synthetic shop) and D minus one customer, each with its own state folder, queried
through the real ClientApp handlers with hand-built Flower messages, as the coordinator would.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

import client.app as client_app
from client import merchant
from client.settings import MerchantSettings
from shared import protocol
from shared.adapters import extract_adapter
from shared.config import RunConfig
from simulations.synthetic import generate_merchant
from tests.test_wire_replies import _metadata, delivered

MERCHANT_ID = "shop"  # the same id (the split's salt) for D and its neighbour: the same split


def make_shop(folder: Path, base_customers: int = 40, seed: int = 3) -> Path:
    generate_merchant(seed, 0, folder, base_customers=base_customers)
    return folder


def customers_of(shop: Path) -> list[str]:
    lines = (shop / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return sorted({json.loads(line)["customer_id"] for line in lines if line.strip()})


def without(shop: Path, customer_id: str, folder: Path) -> Path:
    """A copy of `shop` whose events lack every event of `customer_id`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (shop / "events.jsonl").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["customer_id"] != customer_id]
    assert len(kept) < len(lines), f"{customer_id} has no events in {shop}"
    (folder / "events.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    return folder


def settings(data_dir: Path, state_dir: Path, tiny_bert: str, **overrides: Any) -> MerchantSettings:
    values: dict[str, Any] = {
        "merchant_id": MERCHANT_ID,
        "data_dir": data_dir,
        "state_dir": state_dir,
        "max_epsilon": 20.0,
        "declared_customers": 64,
        "policy": {"backbones": [tiny_bert]},
        **overrides,
    }
    return MerchantSettings.parse(values, source="test")


def message(
    kind: str, config: dict[str, Any], adapter: dict[str, torch.Tensor], *, round_: int = 1, key: str = "run"
) -> Message:
    content = protocol.encode_request(protocol.Request(config, round_, key, adapter))
    return delivered(content, _metadata(message_id="req", src=0, dst=7, kind=kind))


def ask(kind: str, msg: Message, s: MerchantSettings) -> protocol.Reply:
    """The reply of the real ClientApp handler, as the coordinator decodes it, from merchant `s`."""
    handler = client_app.train if kind == protocol.TRAIN else client_app.evaluate
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = handler(msg, context, lambda _context: s)
    return protocol.decode_reply(kind, reply.content)


def global_adapter(cfg: RunConfig, s: MerchantSettings) -> dict[str, torch.Tensor]:
    model, *_ = merchant._model(s, cfg)
    return {k: v.clone() for k, v in extract_adapter(model).items()}


@contextmanager
def fixed_randomness(seed: int = 1234) -> Iterator[None]:
    """The mechanism's randomness fixed (tests only): the same noise for D and its neighbour."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(secrets, "randbits", lambda _bits: seed)
        original = np.random.default_rng
        mp.setattr(np.random, "default_rng", lambda s=None: original(seed if s is None else s))
        yield


def clear_caches() -> None:
    merchant.cached_model.cache_clear()
    merchant.cached_encoder.cache_clear()
    merchant.cached_data.cache_clear()


def fresh_state(root: Path) -> Path:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root
