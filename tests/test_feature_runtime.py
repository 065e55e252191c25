"""Head mode's frozen features computed by ONNX Runtime (`feature-runtime = onnx | onnx-int8`): the
same features as PyTorch within 1e-4 in float32, kept apart from PyTorch's in the cache, and a head
trained on them by the same DP-SGD steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.settings import MerchantSettings
from client.training.feature_cache import open_cache
from client.training.features import head_inputs, head_module
from client.training.loop import DPSettings, TrainSettings, train_dp
from shared.adapters import extract_adapter
from tests.test_feature_cache import CPU, encode, model_of, texts

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _features(model: torch.nn.Module, data: object, runtime: str, cache: object = None) -> torch.Tensor:
    head = head_module(model)
    assert head is not None
    return head_inputs(model, head, data, device=CPU, chunk=5, cache=cache, runtime=runtime).values  # type: ignore[arg-type]


def test_onnx_features_equal_torch_features_and_live_in_their_own_cache_space(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDBEHAVIOR_ONNX_CACHE", str(tmp_path / "onnx"))
    model, data = model_of(tiny_bert), encode(tiny_bert, texts(12))
    eager = _features(model, data, "torch")
    onnx = _features(model, data, "onnx")
    torch.testing.assert_close(onnx, eager, rtol=0, atol=1e-4)
    int8 = _features(model, data, "onnx-int8")
    assert int8.shape == eager.shape and not torch.equal(int8, eager)
    cache = open_cache(tmp_path / "fc", 64)
    assert cache is not None
    for runtime in ("torch", "onnx", "onnx-int8"):
        _features(model, data, runtime, cache)
    assert len([p for p in (tmp_path / "fc").iterdir() if p.is_dir()]) == 3  # one space per runtime
    torch.testing.assert_close(_features(model, data, "onnx", cache), onnx, rtol=0, atol=0)


def test_a_head_trained_on_onnx_features_matches_one_trained_on_torch_features(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDBEHAVIOR_ONNX_CACHE", str(tmp_path / "onnx"))
    data = encode(tiny_bert, texts(16))
    heads = {}
    for runtime in ("torch", "onnx"):
        model = model_of(tiny_bert)
        train_dp(
            model,
            data,
            settings=TrainSettings(
                batch_size=3, epochs=2, learning_rate=0.05, max_physical_batch=5, feature_runtime=runtime
            ),
            dp=DPSettings(noise_multiplier=0.7, max_grad_norm=0.5),
            device=CPU,
            groups=torch.arange(len(data)) // 2,
            seed=11,
        )
        heads[runtime] = extract_adapter(model)
    for key, value in heads["torch"].items():
        torch.testing.assert_close(heads["onnx"][key], value, rtol=0, atol=1e-3)


def test_the_merchant_setting_names_its_choices() -> None:
    assert MerchantSettings(merchant_id="m").feature_runtime == "torch"
    with pytest.raises(ValueError, match="feature_runtime"):
        MerchantSettings(merchant_id="m", feature_runtime="tensorrt")  # type: ignore[arg-type]
