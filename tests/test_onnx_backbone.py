"""ONNX Runtime inference (client/training/onnx_backbone.py): scores and pooled features agree with eager
PyTorch on a tiny BERT with LoRA (merged on export) and a head, the cache is keyed by what changes
the graph, and predict / serve with --runtime onnx give predict's torch scores.

Tolerances (maximum absolute difference of a class probability):

* onnx (float32): 1e-4. The graph computes the same float32 operations; ONNX Runtime only fuses and
  reorders them (measured ~1e-7 here and on MiniLM-L6), so 1e-4 is three orders of margin while
  still catching any real mismatch (the adapter left out, a lost padding mask: 1e-3 to 0.2 here).
* onnx-int8: 3e-2, and the same ranking of the scored texts (Spearman >= 0.95) for mean poolings.
  Dynamic quantisation rounds each output channel of a weight matrix to 255 levels of its range and
  each activation per call: ~1% of the activations per layer. Measured 1e-3 to 8e-3 on these tiny
  random BERTs (and ~3e-3 on MiniLM-L6 with a random head); the bound leaves ~4x margin. A trained
  head amplifies the error: MiniLM-L6 with a head trained on synthetic data moved by 0.04 on average
  (max 0.17) while its AUC moved by 4e-4 (simulations/bench_onnx.py), which is why int8 is tested
  on ranks, not only on an absolute bound. Ranking is what scoring is for, so it is tested where the
  eager scores spread (0.07 and 0.3 here); a random [CLS] pooler (tanh of a random projection) gives
  every text nearly the same score (spread 1e-3, below int8's resolution): there only the absolute
  bound holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from client.evaluation.predict import predict
from client.ingest.encoded import Encoded
from client.training import onnx_backbone
from client.training.features import head_inputs, head_module
from client.training.onnx_backbone import (
    OnnxUnavailable,
    check_runtime,
    export_onnx,
    onnx_pooled_features,
    onnx_runner,
)
from shared.config import RunConfig
from shared.model import build_model
from shared.trained import load_trained
from tests.trained_run import make_run

FP32_TOL = 1e-4
INT8_TOL = 3e-2
INT8_RANK = 0.95

TEXTS = [
    "view iphone 12 phones 5999 ; fav iphone 12 phones 5999",
    "cart 书 books 20",
    "search",
    "view lipstick beauty 199 ; cart lipstick beauty 199 ; buy lipstick beauty 199",
    "view 三 体 books 59 ; view desk lamp home 129",
    "view running shoes shoes 499",
    "fav chocolate snacks 25 ; view lego city toys 399 ; search ; view iphone 12 phones 5999",
    "view thinkpad x1 laptops 9999",
] * 3


@pytest.fixture(scope="module")
def runs(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs whose adapters have non-zero LoRA B and head, for each pooling."""
    root = tmp_path_factory.mktemp("onnx")
    return {
        pooling: make_run(root / pooling, tiny_bert, pooling=pooling)
        for pooling in ("mean-l2", "mean", "cls")
    }


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "onnx-cache"


def eager(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(**batch).logits.float(), dim=-1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


@pytest.mark.parametrize("pooling", ["mean-l2", "mean", "cls"])
def test_scores_and_pooled_agree_with_eager(runs: dict[str, Path], cache: Path, pooling: str) -> None:
    trained = load_trained(runs[pooling])  # a PeftModel: LoRA unmerged, merged only in the export
    batch = dict(trained.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    expected = eager(trained.model, batch)
    captured: list[torch.Tensor] = []
    head = head_module_of(trained.model)
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    eager(trained.model, batch)
    handle.remove()

    runner = onnx_runner(trained.model, "onnx", threads=1, cache_dir=cache)
    got = runner.probabilities(batch)
    assert (got - expected).abs().max() <= FP32_TOL
    assert np.abs(runner.run(batch, "pooled") - captured[0].numpy()).max() <= FP32_TOL
    # one text alone (no padding at all) and a batch of one: the dynamic axes and the padding mask
    alone = dict(trained.tokenizer(TEXTS[2:3], return_tensors="pt"))
    assert (runner.probabilities(alone) - eager(trained.model, alone)).abs().max() <= FP32_TOL

    int8 = onnx_runner(trained.model, "onnx-int8", threads=1, cache_dir=cache)
    coarse = int8.probabilities(batch)
    assert (coarse - expected).abs().max() <= INT8_TOL
    if pooling != "cls":  # random [CLS] poolers score every text alike (spread 1e-3): nothing to rank
        assert spearman(coarse[:, 1].numpy(), expected[:, 1].numpy()) >= INT8_RANK
    # the live model keeps its unmerged LoRA and its scores
    assert any("lora_B" in name for name, _ in trained.model.named_parameters())
    assert torch.equal(eager(trained.model, batch), expected)


def head_module_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module named `classifier` that runs (PEFT's ModulesToSaveWrapper or the plain Linear)."""
    return next(m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "classifier")


def test_head_mode_features_equal_head_inputs(tiny_bert: str, cache: Path) -> None:
    """`onnx_pooled_features` gives what `client.training.features.head_inputs` gives, for a head-mode model
    (LoRA frozen at B = 0) and an `Encoded` padded to max-length; a new head exports nothing."""
    cfg = RunConfig.parse({"backbone": tiny_bert, "trainable": "head", "max-length": 32})
    model = build_model(tiny_bert, num_labels=2, lora=cfg.lora, pooling=cfg.pooling)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tokenizer(TEXTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    data = Encoded(enc["input_ids"], enc["attention_mask"], torch.zeros(len(TEXTS), dtype=torch.long))
    head = head_module(model)
    assert head is not None
    expected = head_inputs(model, head, data, device=torch.device("cpu"), chunk=5).values
    got = onnx_pooled_features(model, data, chunk=7, threads=1, cache_dir=cache)
    assert got.shape == expected.shape and (got - expected).abs().max() <= FP32_TOL
    some = torch.tensor([5, 0, 3])
    assert torch.allclose(onnx_pooled_features(model, data, rows=some, cache_dir=cache), got[some])
    assert model.training  # left as it was

    files = sorted(p.name for p in cache.glob("*.onnx"))
    with torch.no_grad():  # a round of head training changes the head only: the pooled graph is reused
        for param in head.parameters():
            param.add_(1.0)
    assert torch.equal(onnx_pooled_features(model, data, chunk=7, threads=1, cache_dir=cache), got)
    assert sorted(p.name for p in cache.glob("*.onnx")) == files
    empty = Encoded(enc["input_ids"][:0], enc["attention_mask"][:0], torch.zeros(0, dtype=torch.long))
    assert onnx_pooled_features(model, empty, cache_dir=cache).shape == (0, expected.shape[1])


def test_cache_is_keyed_by_weights_and_quantisation(
    runs: dict[str, Path], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_trained(runs["mean-l2"]).model
    first = export_onnx(model, cache_dir=cache)
    int8 = export_onnx(model, quantize=True, cache_dir=cache)
    assert first != int8 and first.exists() and int8.exists()
    assert int8.stat().st_size < first.stat().st_size

    def no_export(*_: object, **__: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_backbone, "_export", no_export)
    monkeypatch.setattr(onnx_backbone, "_quantise", no_export)
    assert export_onnx(model, cache_dir=cache) == first  # a hit: same weights, same settings
    assert export_onnx(model, quantize=True, cache_dir=cache) == int8
    monkeypatch.undo()

    with torch.no_grad():  # a changed LoRA weight is a changed model
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.5)
    changed = export_onnx(model, cache_dir=cache)
    assert changed != first
    # bounded: only the most recently used files are kept
    export_onnx(model, quantize=True, cache_dir=cache, keep=2)
    assert len(list(cache.glob("*.onnx"))) == 2 and not first.exists()
    assert not list(cache.glob(".*"))  # no temp file left behind


def test_env_names_the_cache(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBEHAVIOR_ONNX_CACHE", str(tmp_path / "env-cache"))
    assert onnx_backbone.cache_root() == tmp_path / "env-cache"
    assert onnx_backbone.cache_root(tmp_path / "given") == tmp_path / "given"


def test_missing_onnxruntime_names_the_extra(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from client.serving.service import ServeOptions

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    assert check_runtime("torch") == "torch"
    for call in (
        lambda: check_runtime("onnx-int8"),
        lambda: predict(runs["mean-l2"], tmp_path / "none.csv", tmp_path / "s.csv", runtime="onnx"),
        lambda: ServeOptions(runtime="onnx"),
    ):
        with pytest.raises(OnnxUnavailable, match=r"pip install 'fedbehavior\[onnx\]'"):
            call()
    with pytest.raises(ValueError, match="--runtime 'tensorrt'"):
        check_runtime("tensorrt")


HEADER = "customer_id,session_id,timestamp,behavior,title,category,price\n"
ROWS = [
    "c1,s1,2026-01-01T10:00:00Z,view,iphone 12,phones,5999",
    "c1,s1,2026-01-01T10:01:00Z,fav,iphone 12,phones,5999",
    "c1,s2,2026-01-02T09:00:00Z,search,,,",
    "c2,s3,2026-01-01T11:00:00Z,view,书,books,20",
    "c2,s3,2026-01-01T11:02:00Z,cart,书,books,20",
    "c3,s4,2026-01-03T11:00:00Z,view,lipstick,beauty,199",
    "c3,s4,2026-01-03T11:01:00Z,view,desk lamp,home,129",
    "c3,s4,2026-01-03T11:02:00Z,cart,lipstick,beauty,199",
]


def rows_of(path: Path) -> dict[tuple[str, str], dict[str, object]]:
    return {(r["customer_id"], r["session_id"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_predict_runtime_onnx_equals_torch(runs: dict[str, Path], tmp_path: Path) -> None:
    events = tmp_path / "export.csv"
    events.write_text(HEADER + "\n".join(ROWS) + "\n", encoding="utf-8")
    model = runs["mean-l2"] / "final"
    torch_out = rows_of(Path(predict(model, events, tmp_path / "t.jsonl", fmt="csv").out))
    for runtime, tol in (("onnx", FP32_TOL), ("onnx-int8", INT8_TOL)):
        report = predict(
            model, events, tmp_path / f"{runtime}.jsonl", fmt="csv", runtime=runtime, threads=1,
            onnx_cache=tmp_path / "cache",
        )  # fmt: skip
        assert report.runtime == runtime and report.device == "cpu" and report.rows == len(torch_out) == 4
        got = rows_of(Path(report.out))
        assert got.keys() == torch_out.keys()
        for key, row in got.items():
            expected = torch_out[key]
            assert {k: v for k, v in row.items() if not k.startswith("p_") and k != "predicted"} == {
                k: v for k, v in expected.items() if not k.startswith("p_") and k != "predicted"
            }
            for label in ("no-buy", "buy"):
                assert abs(float(row[f"p_{label}"]) - float(expected[f"p_{label}"])) <= tol  # type: ignore[arg-type]
            if runtime == "onnx":
                assert row["predicted"] == expected["predicted"]
    with pytest.raises(ValueError, match="runs on the CPU"):
        predict(model, events, tmp_path / "x.csv", fmt="csv", runtime="onnx", device="cuda")


def test_serve_runtime_onnx_scores_like_predict(runs: dict[str, Path], tmp_path: Path) -> None:
    import grpc

    from client.serving import scorer_pb2_grpc
    from client.serving.cli import add_serve_cli, options_of
    from client.serving.service import ServeOptions, start_server
    from tests.test_serve import EVENTS, as_dict, as_dict_of, predicted, request_of

    model = runs["mean-l2"] / "final"
    expected = as_dict_of(predicted(model, EVENTS, tmp_path))  # predict, torch runtime
    options = ServeOptions(port=0, window_ms=2.0, runtime="onnx", threads=1, onnx_cache=tmp_path / "cache")
    server = start_server(model, options)
    try:
        assert server.slot.current.runner is not None
        stub = scorer_pb2_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        got = as_dict(stub.Score(request_of(EVENTS), timeout=30))
        assert got.keys() == expected.keys()
        assert max(abs(got[k][x] - expected[k][x]) for k in got for x in got[k]) <= FP32_TOL
        reloaded = server.reload()  # the graph comes from the cache: same scores, new generation
        assert reloaded.generation == 2 and reloaded.runner is not None
        again = as_dict(stub.Score(request_of(EVENTS), timeout=30))
        assert max(abs(again[k][x] - got[k][x]) for k in got for x in got[k]) <= 1e-6
    finally:
        server.stop(1.0)

    import argparse

    parser = argparse.ArgumentParser()
    add_serve_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "m", "--runtime", "onnx-int8", "--threads", "1"])
    assert (options_of(args).runtime, options_of(args).threads) == ("onnx-int8", 1)
    with pytest.raises(ValueError, match="--precision bf16"):
        ServeOptions(runtime="onnx", precision="bf16")
    with pytest.raises(ValueError, match="runs on the CPU"):
        ServeOptions(runtime="onnx-int8", device="cuda")
