"""The linear-probe fast path: frozen features computed once give the head exactly the gradients,
clipped sums and trained weights that running the whole model at every step gives."""

from __future__ import annotations

import pytest
import torch

from client.training.features import HeadOnFeatures, head_inputs, head_module
from client.training.loop import DPSettings, TrainSettings, train_dp
from shared.adapters import extract_adapter
from shared.model import POOLING, build_model
from shared.model_spec import LoraSpec
from tests.test_customer_dp import module_clipped_sum
from tests.test_dp_training import encode

CPU = torch.device("cpu")
HEAD = LoraSpec(r=2, alpha=4, trainable="head")


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The features are computed in eval mode; the per-step path trains in train mode, so compare
    the two on a model whose dropout is off."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_the_head_is_found_only_when_it_is_all_that_trains(tiny_bert: str) -> None:
    head_only = build_model(tiny_bert, num_labels=2, lora=HEAD)
    assert head_module(head_only) is head_only.get_submodule("base_model.model.classifier")
    assert (
        head_module(build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4)))
        is None
    )
    frozen = build_model(tiny_bert, num_labels=2, lora=HEAD)
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert head_module(frozen) is None


@pytest.mark.parametrize("pooling", sorted(POOLING))
def test_the_head_on_the_features_gives_the_model_s_logits(tiny_bert: str, pooling: str) -> None:
    model = build_model(tiny_bert, num_labels=3, lora=HEAD, pooling=pooling, init_seed=2)
    data = encode(tiny_bert, 10)
    head = head_module(model)
    assert head is not None
    feats = head_inputs(model, head, data, device=CPU, chunk=4)  # 3 chunks: 4 + 4 + 2
    assert feats.values.shape == (10, model.config.hidden_size) and torch.equal(feats.labels, data.labels)
    assert model.training  # the mode it came in with is restored
    model.eval()
    with torch.no_grad():
        expected = model(**data.inputs(slice(None), CPU)).logits
        got = HeadOnFeatures(head)(**feats.inputs(slice(None), CPU)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if pooling == "mean-l2":
        torch.testing.assert_close(feats.values.norm(dim=1), torch.ones(10))


def test_per_customer_clipped_sums_match_the_whole_model(tiny_bert: str) -> None:
    model = without_dropout(build_model(tiny_bert, num_labels=2, lora=HEAD, init_seed=1))
    data = encode(tiny_bert, 11)
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4])
    head = head_module(model)
    assert head is not None
    feats = head_inputs(model, head, data, device=CPU, chunk=5)
    # clip 0.05: small enough that some customers are clipped and some are not
    for clip in (0.05, 100.0):
        whole = module_clipped_sum(model, data, groups, clip)
        fast = module_clipped_sum(HeadOnFeatures(head), feats, groups, clip)  # type: ignore[arg-type]
        assert len(fast) == len(whole) == 2  # the head's weight and bias
        for a, b in zip(fast, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_training_on_frozen_features_equals_training_through_the_model(tiny_bert: str) -> None:
    data = encode(tiny_bert, 24)
    groups = torch.arange(24) // 3  # 8 customers of 3 examples
    trained = {}
    initial = extract_adapter(without_dropout(build_model(tiny_bert, num_labels=2, lora=HEAD, init_seed=4)))
    for frozen in (True, False):
        model = without_dropout(build_model(tiny_bert, num_labels=2, lora=HEAD, init_seed=4))
        before = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
        result = train_dp(
            model,
            data,
            settings=TrainSettings(batch_size=3, epochs=2, learning_rate=0.05, frozen_features=frozen),
            dp=DPSettings(noise_multiplier=0.7, max_grad_norm=0.5),
            device=CPU,
            groups=groups,
            seed=11,
        )
        assert (result.steps, result.customers) == (6, 8)
        for k, v in model.named_parameters():
            if not v.requires_grad:
                assert torch.equal(v, before[k]), f"frozen weight {k} changed"
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
        trained[frozen] = (extract_adapter(model), result.loss)
    (fast, fast_loss), (slow, slow_loss) = trained[True], trained[False]
    assert fast.keys() == slow.keys()
    assert any(not torch.equal(fast[k], initial[k]) for k in fast if "classifier" in k)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-6)
    assert fast_loss == pytest.approx(slow_loss, rel=1e-5)
