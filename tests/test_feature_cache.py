"""The merchant's head-mode feature cache: the same trained head with it or without it, a miss for
anything that changes the features, a bounded disk, no backbone pass for texts already seen, and
shards that are checked, never trusted."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from client import merchant
from client.ingest.encoded import Encoded
from client.settings import MerchantSettings
from client.training.feature_cache import FeatureCache, backbone_fingerprint, open_cache
from client.training.features import head_inputs, head_module
from client.training.loop import DPSettings, TrainSettings, predict, train_dp
from shared.adapters import extract_adapter
from shared.config import RunConfig
from shared.model import build_model, load_tokenizer
from shared.model_spec import LoraSpec
from simulations.synthetic import generate_merchant

CPU = torch.device("cpu")
HEAD = LoraSpec(r=2, alpha=4, trainable="head")
PRODUCTS = ["iphone", "xiaomi", "oreo", "cookies", "phone", "snacks"]
MB = 2**20


def texts(n: int, offset: int = 0) -> list[str]:
    """`n` distinct behaviour texts (distinct token ids), `offset` picks another set."""
    return [
        f"view {PRODUCTS[i % len(PRODUCTS)]} {i + offset} ; cart {PRODUCTS[(i // 6) % len(PRODUCTS)]}"
        for i in range(n)
    ]


def encode(backbone: str, lines: list[str], max_length: int = 24) -> Encoded:
    batch = load_tokenizer(backbone)(
        lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    labels = torch.tensor([i % 2 for i in range(len(lines))])
    return Encoded(batch["input_ids"], batch["attention_mask"], labels)


@contextmanager
def backbone_rows(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the examples that go through the BERT encoder (one entry per forward pass)."""
    rows: list[int] = []
    bert = model.get_base_model().bert  # type: ignore[operator]

    def count(_: torch.nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]) -> None:
        rows.append(int((args[0] if args else kwargs["input_ids"]).shape[0]))

    handle = bert.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def model_of(backbone: str, *, pooling: str = "mean-l2", seed: int = 4) -> torch.nn.Module:
    return build_model(backbone, num_labels=2, lora=HEAD, pooling=pooling, init_seed=seed)


def features(model: torch.nn.Module, data: Encoded, cache: FeatureCache | None) -> torch.Tensor:
    head = head_module(model)
    assert head is not None
    return head_inputs(model, head, data, device=CPU, chunk=5, cache=cache).values


def shards(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.safetensors"))


def train(backbone: str, data: Encoded, cache: FeatureCache | None) -> dict[str, torch.Tensor]:
    model = model_of(backbone)
    train_dp(
        model,
        data,
        settings=TrainSettings(batch_size=3, epochs=2, learning_rate=0.05, max_physical_batch=5),
        dp=DPSettings(noise_multiplier=0.7, max_grad_norm=0.5),
        device=CPU,
        groups=torch.arange(len(data)) // 2,
        seed=11,
        feature_cache=cache,
    )
    return extract_adapter(model)


def test_the_cache_leaves_the_trained_head_unchanged(tiny_bert: str, tmp_path: Path) -> None:
    data = encode(tiny_bert, texts(16))
    cache = FeatureCache(tmp_path / "fc", 64 * MB)
    without = train(tiny_bert, data, None)
    cold = train(tiny_bert, data, cache)  # every row computed, then stored
    warm = train(tiny_bert, data, cache)  # every row read back
    assert shards(tmp_path / "fc")
    for trained in (cold, warm):
        assert trained.keys() == without.keys()
        for key in without:
            assert torch.equal(trained[key], without[key]), key
    # a process that starts afresh (a second run) reads the same bits from disk
    rerun = train(tiny_bert, data, FeatureCache(tmp_path / "fc", 64 * MB))
    assert all(torch.equal(rerun[key], without[key]) for key in without)


def test_hits_are_the_computed_features_and_misses_only_are_computed(tiny_bert: str, tmp_path: Path) -> None:
    model = model_of(tiny_bert)
    cache = FeatureCache(tmp_path / "fc", 64 * MB)
    old, new = texts(12), texts(5, offset=100)
    reference = features(model, encode(tiny_bert, old + new), None)
    with backbone_rows(model) as rows:
        first = features(model, encode(tiny_bert, old), cache)
    assert sum(rows) == 12 and torch.equal(first, reference[:12])
    mixed = encode(tiny_bert, [new[0], old[3], new[1], old[0], *new[2:], old[7]])
    with backbone_rows(model) as rows:
        got = features(model, mixed, cache)
    assert sum(rows) == 5  # the new texts only
    expected = reference[[12, 3, 13, 0, 14, 15, 16, 7]]
    assert torch.equal(got[[1, 3, 7]], expected[[1, 3, 7]])  # hits: the very tensors computed before
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # misses: other chunks, same values
    with backbone_rows(model) as rows:
        again = features(model, mixed, cache)
    assert rows == [] and torch.equal(again, got)


def test_a_second_round_and_a_second_run_run_no_backbone_pass(tiny_bert: str, tmp_path: Path) -> None:
    data = encode(tiny_bert, texts(14))
    model = model_of(tiny_bert)
    settings = TrainSettings(batch_size=3, epochs=1, learning_rate=0.05, max_physical_batch=4)
    dp = DPSettings(noise_multiplier=0.7, max_grad_norm=0.5)
    cache = FeatureCache(tmp_path / "fc", 64 * MB)
    counted = []
    threads = torch.get_num_threads()
    for round_seed in (1, 2):  # the head changes between rounds: its input does not
        with backbone_rows(model) as rows:
            train_dp(model, data, settings=settings, dp=dp, device=CPU, seed=round_seed, feature_cache=cache)
        counted.append(sum(rows))
    assert counted == [14, 0]
    assert torch.get_num_threads() == threads  # the head's steps ran on one thread, then it was restored
    # a second run: a new process (new model object, new cache object) on the same state folder
    again = model_of(tiny_bert)
    with backbone_rows(again) as rows:
        train_dp(
            again,
            data,
            settings=settings,
            dp=dp,
            device=CPU,
            seed=3,
            feature_cache=open_cache(tmp_path / "fc", 64),
        )
        probs, _ = predict(
            again, data, batch_size=4, device=CPU, feature_cache=open_cache(tmp_path / "fc", 64)
        )
    assert rows == []
    plain, _ = predict(again, data, batch_size=4, device=CPU)
    torch.testing.assert_close(torch.from_numpy(probs), torch.from_numpy(plain), rtol=1e-5, atol=1e-6)


def test_anything_that_changes_the_features_misses(tiny_bert: str, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "fc", 64 * MB)
    lines = texts(6)
    data = encode(tiny_bert, lines)
    model = model_of(tiny_bert)
    features(model, data, cache)

    def computed(model: torch.nn.Module, data: Encoded) -> int:
        with backbone_rows(model) as rows:
            features(model, data, cache)
        return sum(rows)

    assert computed(model, data) == 0
    assert computed(model_of(tiny_bert), data) == 0  # another process's model: the same backbone
    head = head_module(model)
    assert head is not None
    with torch.no_grad():  # training moves the head every round: what it reads does not change
        for param in head.parameters():
            param.add_(0.5)
    assert computed(model, data) == 0
    # the text: one changed example is the only one computed
    assert computed(model, encode(tiny_bert, [*lines[:5], "search 手机 包邮"])) == 1
    assert computed(model, encode(tiny_bert, lines, max_length=32)) == 6  # the max length
    assert computed(model_of(tiny_bert, pooling="mean"), data) == 6  # the pooling
    assert computed(model_of(tiny_bert, pooling="cls"), data) == 6
    lora = model_of(tiny_bert)
    with torch.no_grad():  # a non-zero LoRA B (a coordinator's adapter) changes the backbone's output
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    assert computed(lora, data) == 6
    before = backbone_fingerprint(model, head)
    with torch.no_grad():  # a backbone weight, written in place on the model already fingerprinted
        model.get_base_model().bert.encoder.layer[1].output.dense.weight[0, 0] += 1e-3
    assert backbone_fingerprint(model, head) != before
    assert computed(model, data) == 6
    with torch.no_grad():  # written through `.data`, around PyTorch's version counter
        model.get_base_model().bert.embeddings.word_embeddings.weight.data.mul_(1.01)
    assert computed(model, data) == 6


def test_the_disk_bound_evicts_the_least_recently_used(tiny_bert: str, tmp_path: Path) -> None:
    root = tmp_path / "fc"
    model = model_of(tiny_bert)
    probe = FeatureCache(root / "probe", 64 * MB, shard_rows=4)
    features(model, encode(tiny_bert, texts(4)), probe)
    shard_size = shards(root / "probe")[0].stat().st_size
    cache = FeatureCache(root / "bounded", 3 * shard_size, shard_rows=4)
    sets = [texts(4, offset=10 * i) for i in range(4)]
    for i, lines in enumerate(sets[:3]):
        features(model, encode(tiny_bert, lines), cache)
        for path in shards(root / "bounded"):  # distinct, increasing mtimes in the order written
            if path.stat().st_mtime > 1000 * (i + 1):
                os.utime(path, (1000 * (i + 1), 1000 * (i + 1)))
    assert len(shards(root / "bounded")) == 3
    with backbone_rows(model) as rows:  # a hit makes the oldest set the most recently used
        features(model, encode(tiny_bert, sets[0]), cache)
    assert rows == []
    features(model, encode(tiny_bert, sets[3]), cache)  # a fourth shard: one must go
    assert cache.size_bytes() <= 3 * shard_size and len(shards(root / "bounded")) == 3
    with backbone_rows(model) as rows:
        features(model, encode(tiny_bert, sets[0]), cache)
        features(model, encode(tiny_bert, sets[2]), cache)
    assert rows == []
    with backbone_rows(model) as rows:
        features(model, encode(tiny_bert, sets[1]), cache)  # the least recently used, evicted
    assert sum(rows) == 4
    assert open_cache(tmp_path / "off", 0) is None


@pytest.mark.parametrize("damage", ["flip-first", "flip-last", "truncate", "garbage"])
def test_a_damaged_shard_is_recomputed_not_trusted(tiny_bert: str, tmp_path: Path, damage: str) -> None:
    model = model_of(tiny_bert)
    data = encode(tiny_bert, texts(8))
    cache = FeatureCache(tmp_path / "fc", 64 * MB)
    expected = features(model, data, cache)
    (path,) = shards(tmp_path / "fc")
    blob = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(blob[:8], "little")  # safetensors: header length, header, data
    if damage == "flip-first":
        blob[data_start + 2] ^= 0x40  # a bit of the first tensor stored (values or keys)
    elif damage == "flip-last":
        blob[-3] ^= 0x40  # a bit of the last one
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray(b"not a shard" * 10)
    path.write_bytes(bytes(blob))
    (path.parent / ".half-written.safetensors.x.tmp").write_bytes(b"partial")  # a writer that died
    for reader in (cache, FeatureCache(tmp_path / "fc", 64 * MB)):  # an index built before or after
        with backbone_rows(model) as rows:
            got = features(model, data, reader)
        assert sum(rows) == 8 and torch.equal(got, expected)
        (path,) = shards(tmp_path / "fc")  # recomputed rows stored afresh, the damage gone
        assert path.read_bytes() != bytes(blob)
        path.write_bytes(bytes(blob))


def test_a_merchant_keeps_its_features_in_its_state_folder(tiny_bert: str, tmp_path: Path) -> None:
    generate_merchant(3, 0, tmp_path / "m0", base_customers=40)
    cfg = RunConfig.parse(
        {"backbone": tiny_bert, "lora-r": 2, "batch-size": 16, "max-length": 32, "num-rounds": 3}
    )
    settings = MerchantSettings.from_merchant_dir(tmp_path / "m0", declared_customers=40, max_epsilon=50.0)
    model, *_ = merchant._prepare(settings, cfg)
    adapter = extract_adapter(model)
    counted = []
    for rnd in (1, 2, 3):
        with backbone_rows(model) as rows:
            trained = merchant.train_round(settings, cfg, adapter, server_round=rnd, run_id="r", seed=rnd)
            evaluated = merchant.evaluate_round(
                settings, cfg, adapter, server_round=rnd, run_id="r", seed=rnd
            )
        assert (trained.status, evaluated.status) == ("trained", "evaluated")
        counted.append(sum(rows))
    assert shards(settings.feature_cache_dir)
    # later rounds compute only the sessions no earlier round picked (k per customer, a fresh pick
    # per round); the held-out set is the same every round
    assert counted[0] > 0 and counted[1] < counted[0] / 2 and counted[2] <= counted[1]
    off = MerchantSettings.from_merchant_dir(tmp_path / "m0", declared_customers=40, feature_cache_mb=0)
    assert merchant.feature_cache(off) is None


def test_rows_that_do_not_fit_the_head_are_not_used(tiny_bert: str, tmp_path: Path) -> None:
    model = model_of(tiny_bert)
    head = head_module(model)
    assert head is not None
    data = encode(tiny_bert, texts(4))
    cache = FeatureCache(tmp_path / "fc", 64 * MB)
    space = cache.space(model, head, max_length=24, device=CPU)
    space.store(space.keys(data), torch.ones((4, 7)))  # well-formed shard, wrong width
    with backbone_rows(model) as rows:
        got = features(model, data, cache)
    assert sum(rows) == 4 and torch.equal(got, features(model, data, None))
