"""The merchant's persistent cache of frozen-backbone features (head mode), on its own disk.

In head mode (`trainable=head`) everything below the classifier is fixed, so the pooled embedding
the head reads for a text is a pure function of (the weights below the head, the pooling, the
tokenised text). `client.training.features.head_inputs` looks every example up here first and runs the
backbone only over the misses: a round after the first, and a second run on the same data, costs
no forward pass for texts the merchant has already embedded.

Content addressing. A *space* is one directory, `<state_dir>/feature-cache/<space>/`, named by a
digest of everything that decides the features besides the text: the backbone fingerprint (a hash
of every tensor of the model that is not the head, LoRA matrices included, and of the model's class,
i.e. its pooling, its config, its adapter scalings, and the torch / transformers versions), the
pooling, the padded length (`max-length`) and the device type. A row's key is a digest of the space
and the example's exact token ids and attention mask. Change any weight below the head, the pooling,
the max length or the text, and the lookup misses: a stale feature is never returned.

Storage. Write-once shards (`<digest>.safetensors`, at most `shard_rows` rows each) hold the keys
and the feature rows in the dtype the model produced (float32 for a float32 model: exactly the
tensor that was computed, so a hit gives the same bits as the forward pass that filled it). Each
shard carries SHA-256 digests of its keys and its values in its metadata and is checked whenever it
is read; a shard that fails (truncated, flipped bits, not a shard) is deleted and its rows recomputed,
never trusted. Shards are written to a temp file, fsynced and renamed, so a reader sees a whole shard
or none; two processes storing the same rows write the same file name with the same content. The
index (key → shard, row) lives in memory and is rebuilt from the shards' keys, so there is nothing
shared to lock: concurrent processes only ever add whole files or delete them.

Bound. The whole cache (every space) is kept under `feature-cache-mb` by deleting least recently
used shards (a hit touches its shard's mtime); 0 turns the cache off.

Privacy. The cache is the merchant's private state, like its data and its ledger: it never leaves
the merchant, and it changes no feature (a hit returns the very tensor a forward pass computed), so
the DP mechanism and its charge are unchanged. Rows are keyed by content, never by a customer or a
session id: two examples share a row only when their token ids are identical, and then their
features are identical too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from client.ingest.encoded import Encoded

log = logging.getLogger(__name__)

FORMAT = "fedbehavior-feature-cache/1"
SHARD_SUFFIX = ".safetensors"
DEFAULT_SHARD_ROWS = 4096
KEY_BYTES = 16
STALE_TEMP_S = 3600.0  # a temp file this old belongs to a writer that died
# config entries that name or label the model but do not change what the backbone computes
_NOT_FEATURES = frozenset(
    {
        "_name_or_path",
        "architectures",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "transformers_version",
    }
)


def _digest_tensor(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    if not flat.numel():
        return hashlib.sha256(b"").digest()
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).digest()


def _signature(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What identifies a tensor's content without reading it all: storage, PyTorch's version counter
    (bumped by every in-place write, `load_state_dict` included), shape, dtype, device, plus a strided
    probe of 8 values (catches a write through `.data`, which the version counter misses)."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    probe = flat[:: max(1, n // 8)][:8].to(torch.float64).cpu().numpy().tobytes() if n else b""
    return (
        tensor.data_ptr(),
        tensor._version,
        tuple(tensor.shape),
        str(tensor.dtype),
        str(tensor.device),
        probe,
    )


# per model object: state name → (signature, digest); the model's own lifetime bounds the memo
_DIGESTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, tuple[tuple[Any, ...], bytes]]] = (
    weakref.WeakKeyDictionary()
)
_DIGESTS_LOCK = threading.Lock()


def _head_prefixes(model: torch.nn.Module, head: torch.nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, module in model.named_modules() if module is head)


def _description(model: torch.nn.Module, prefixes: tuple[str, ...]) -> str:
    """Everything besides the tensors that decides what the head receives, as canonical JSON."""
    import transformers

    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    config = getattr(base, "config", None)
    settings = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    adapters = []
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and not name.startswith(prefixes):
            adapters.append(
                [
                    name,
                    sorted((str(k), float(v)) for k, v in scaling.items()),
                    bool(getattr(module, "merged", False)),
                    bool(getattr(module, "disable_adapters", False)),
                    [str(a) for a in getattr(module, "active_adapters", [])],
                ]
            )
    description = {
        "format": FORMAT,
        "class": f"{type(base).__module__}.{type(base).__qualname__}",  # the pooling
        "normalize": bool(getattr(base, "normalize", False)),
        "config": {k: v for k, v in settings.items() if k not in _NOT_FEATURES},
        "adapters": adapters,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return json.dumps(description, sort_keys=True, default=str)


def backbone_fingerprint(model: torch.nn.Module, head: torch.nn.Module) -> str:
    """A digest of everything in `model` that decides what `head` receives: every parameter and
    buffer outside the head (LoRA matrices included), the model's class (its pooling), its config
    and adapter scalings. Each tensor's SHA-256 is memoised on the model object and recomputed only
    when the tensor was written since, so a later round costs a walk over the state, not a hash of
    the weights."""
    prefixes = _head_prefixes(model, head)
    whole = hashlib.sha256(_description(model, prefixes).encode("utf-8"))
    with _DIGESTS_LOCK:
        memo = _DIGESTS.setdefault(model, {})
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.startswith(prefixes):
                continue
            signature = _signature(tensor)
            known = memo.get(name)
            if known is None or known[0] != signature:
                known = (signature, _digest_tensor(tensor))
                memo[name] = known
            whole.update(name.encode("utf-8") + b"\0" + known[1])
    return whole.hexdigest()


def space_name(
    fingerprint: str, *, pooling: str, max_length: int, device_type: str, runtime: str = "torch"
) -> str:
    """The directory of one feature space: a digest of what decides the features besides the text
    (the runtime too: ONNX Runtime's features, int8 above all, are not PyTorch's)."""
    fields: dict[str, object] = {
        "format": FORMAT,
        "backbone": fingerprint,
        "pooling": pooling,
        "max_length": max_length,
        "device": device_type,
    }
    if runtime != "torch":
        fields["runtime"] = runtime
    spec = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()[:32]


def pooling_of(model: torch.nn.Module) -> str:
    """The pooling name of `shared.model.POOLING` that `model` uses (its class otherwise)."""
    from shared.model import POOLING

    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    for name, cls in POOLING.items():
        if type(base) is cls:
            return name
    return f"{type(base).__module__}.{type(base).__qualname__}"


def row_keys(space: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
    """Each example's key: a digest of its space and its exact token ids and attention mask."""
    ids = np.ascontiguousarray(input_ids.cpu().numpy().astype(np.int64, copy=False))
    mask = np.ascontiguousarray(attention_mask.cpu().numpy().astype(np.int8, copy=False))
    prefix = hashlib.blake2b(space.encode("utf-8"), digest_size=32).digest()
    keys = []
    for i in range(ids.shape[0]):
        h = hashlib.blake2b(prefix, digest_size=KEY_BYTES)
        h.update(ids[i])
        h.update(mask[i])
        keys.append(h.digest())
    return keys


class CorruptShard(ValueError):
    """A shard whose header, shapes or digests do not check out."""


def _read_shard(path: Path, *, values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A shard's keys (and values), each checked against the digests in its metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # type: ignore[no-untyped-call]
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CorruptShard(f"{path.name}: not a {FORMAT} shard")
            keys = handle.get_tensor("keys")
            got = handle.get_tensor("values") if values else None
    except (CorruptShard, FileNotFoundError):
        raise
    except Exception as err:  # safetensors raises its own error type for a truncated or garbled file
        raise CorruptShard(f"{path.name}: unreadable ({type(err).__name__}: {err})") from err
    if keys.dtype != torch.uint8 or keys.dim() != 2 or keys.shape[1] != KEY_BYTES:
        raise CorruptShard(f"{path.name}: keys of shape {tuple(keys.shape)}")
    if _digest_tensor(keys).hex() != meta.get("keys_sha256"):
        raise CorruptShard(f"{path.name}: keys do not match their digest")
    if got is not None:
        if got.dim() != 2 or got.shape[0] != keys.shape[0]:
            raise CorruptShard(f"{path.name}: values of shape {tuple(got.shape)} for {keys.shape[0]} keys")
        if _digest_tensor(got).hex() != meta.get("values_sha256"):
            raise CorruptShard(f"{path.name}: values do not match their digest")
    return keys, got


@dataclass
class _Index:
    """In memory, per space: which shard (and row) holds each key, from the shards' own keys."""

    shards: dict[str, list[bytes]] = field(default_factory=dict)
    where: dict[bytes, tuple[str, int]] = field(default_factory=dict)

    def drop(self, name: str) -> None:
        for key in self.shards.pop(name, []):
            if self.where.get(key, ("", 0))[0] == name:
                del self.where[key]

    def add(self, name: str, keys: list[bytes]) -> None:
        self.shards[name] = keys
        for row, key in enumerate(keys):
            self.where[key] = (name, row)


class FeatureCache:
    """One merchant's feature cache under `root` (normally `<state_dir>/feature-cache`), at most
    `max_bytes` on disk; `max_bytes` 0 disables it. Safe to share between threads and processes."""

    def __init__(self, root: Path, max_bytes: int, *, shard_rows: int = DEFAULT_SHARD_ROWS) -> None:
        if max_bytes < 0 or shard_rows < 1:
            raise ValueError("max_bytes must be ≥ 0 and shard_rows ≥ 1")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.shard_rows = shard_rows
        self._indexes: dict[str, _Index] = {}
        self._lock = threading.RLock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def space(
        self,
        model: torch.nn.Module,
        head: torch.nn.Module,
        *,
        max_length: int,
        device: torch.device,
        runtime: str = "torch",
    ) -> FeatureSpace:
        """The space of `model`'s features for `head` at `max_length` tokens on `device`'s type,
        computed by `runtime`."""
        name = space_name(
            backbone_fingerprint(model, head),
            pooling=pooling_of(model),
            max_length=max_length,
            device_type=device.type,
            runtime=runtime,
        )
        return FeatureSpace(self, name)

    # --- shards of one space -------------------------------------------------------------------

    def _dir(self, space: str) -> Path:
        return self.root / space

    def _refresh(self, space: str) -> _Index:
        """The space's index, updated with the shards other processes added or removed."""
        index = self._indexes.setdefault(space, _Index())
        try:
            names = {
                entry.name
                for entry in os.scandir(self._dir(space))
                if entry.name.endswith(SHARD_SUFFIX) and not entry.name.startswith(".")
            }
        except FileNotFoundError:
            names = set()
        for gone in set(index.shards) - names:
            index.drop(gone)
        for name in sorted(names - set(index.shards)):
            try:
                keys, _ = _read_shard(self._dir(space) / name, values=False)
            except FileNotFoundError:
                continue
            except CorruptShard as err:
                self._discard(space, name, err)
                continue
            index.add(name, [bytes(row) for row in keys.numpy()])
        return index

    def _discard(self, space: str, name: str, why: Exception) -> None:
        log.warning("feature cache: dropping shard %s/%s, recomputing its rows: %s", space, name, why)
        self._indexes.get(space, _Index()).drop(name)
        with contextlib.suppress(FileNotFoundError):
            (self._dir(space) / name).unlink()

    def lookup(self, space: str, keys: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The positions in `keys` found in the cache and their features (None when none is)."""
        with self._lock:
            index = self._refresh(space)
            by_shard: dict[str, tuple[list[int], list[int]]] = {}
            for position, key in enumerate(keys):
                found = index.where.get(key)
                if found is not None:
                    positions, rows = by_shard.setdefault(found[0], ([], []))
                    positions.append(position)
                    rows.append(found[1])
            hit_positions: list[torch.Tensor] = []
            hit_values: list[torch.Tensor] = []
            for name, (positions, rows) in by_shard.items():
                path = self._dir(space) / name
                try:
                    _, values = _read_shard(path, values=True)
                except FileNotFoundError:  # evicted by another process since the index saw it
                    index.drop(name)
                    continue
                except CorruptShard as err:
                    self._discard(space, name, err)
                    continue
                assert values is not None
                with contextlib.suppress(OSError):
                    os.utime(path)  # most recently used
                hit_positions.append(torch.tensor(positions, dtype=torch.long))
                hit_values.append(values[torch.tensor(rows, dtype=torch.long)])
        if not hit_values:
            return torch.zeros(0, dtype=torch.long), None
        return torch.cat(hit_positions), torch.cat(hit_values)

    def store(self, space: str, keys: Sequence[bytes], values: torch.Tensor) -> None:
        """Add rows (the first of any repeated key), in write-once shards, then enforce the bound."""
        from safetensors.torch import save

        if len(keys) != values.shape[0]:
            raise ValueError(f"{len(keys)} keys for {values.shape[0]} feature rows")
        with self._lock:
            index = self._refresh(space)
            fresh: dict[bytes, int] = {}
            for row, key in enumerate(keys):
                if key not in index.where:
                    fresh.setdefault(key, row)
            if not fresh:
                return
            new_keys = list(fresh)
            rows = torch.tensor(list(fresh.values()), dtype=torch.long)
            new_values = values.detach().cpu()[rows].contiguous()
            folder = self._dir(space)
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            for start in range(0, len(new_keys), self.shard_rows):
                part_keys = new_keys[start : start + self.shard_rows]
                key_tensor = torch.from_numpy(
                    np.frombuffer(b"".join(part_keys), dtype=np.uint8).reshape(-1, KEY_BYTES).copy()
                )
                part_values = new_values[start : start + self.shard_rows].contiguous()
                metadata = {
                    "format": FORMAT,
                    "keys_sha256": _digest_tensor(key_tensor).hex(),
                    "values_sha256": _digest_tensor(part_values).hex(),
                }
                blob = save({"keys": key_tensor, "values": part_values}, metadata=metadata)
                name = hashlib.sha256(blob).hexdigest()[:40] + SHARD_SUFFIX  # same rows, same file
                atomic_write_bytes(folder / name, blob)
                index.add(name, part_keys)
            self.evict()

    # --- the bound -----------------------------------------------------------------------------

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._shards())

    def _shards(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every shard of every space; stale temp files are removed."""
        found: list[tuple[float, int, Path]] = []
        now = time.time()
        try:
            spaces = [entry for entry in os.scandir(self.root) if entry.is_dir()]
        except FileNotFoundError:
            return found
        for space in spaces:
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(space.path):
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        if entry.name.startswith("."):
                            if entry.name.endswith(".tmp") and now - stat.st_mtime > STALE_TEMP_S:
                                os.unlink(entry.path)
                        elif entry.name.endswith(SHARD_SUFFIX):
                            found.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        return found

    def evict(self) -> int:
        """Delete least recently used shards until the cache fits `max_bytes`; the bytes freed."""
        with self._lock:
            shards = sorted(self._shards(), key=lambda s: (s[0], s[2].name))
            total = sum(size for _, size, _ in shards)
            freed = 0
            for _, size, path in shards:
                if total - freed <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                freed += size
                space = path.parent.name
                if space in self._indexes:
                    self._indexes[space].drop(path.name)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only when that was its last shard
            if freed:
                log.info(
                    "feature cache: evicted %.1f MB (bound %.1f MB)", freed / 2**20, self.max_bytes / 2**20
                )
            return freed


@dataclass(frozen=True)
class FeatureSpace:
    """The part of a `FeatureCache` that holds one model's features at one max length."""

    cache: FeatureCache
    name: str

    def keys(self, data: Encoded) -> list[bytes]:
        return row_keys(self.name, data.input_ids, data.attention_mask)

    def lookup(self, keys: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.cache.lookup(self.name, keys)

    def store(self, keys: Sequence[bytes], values: torch.Tensor) -> None:
        self.cache.store(self.name, keys, values)


@lru_cache(maxsize=32)
def open_cache(root: Path, max_mb: int) -> FeatureCache | None:
    """The process's cache object for `root` (so its index survives between rounds), bounded at
    `max_mb` MiB; None when `max_mb` is 0."""
    if max_mb <= 0:
        return None
    return FeatureCache(Path(root), max_mb * 2**20)
