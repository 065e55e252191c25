"""The classifier: mean pooling ignores padding; only LoRA and the head are trainable; any local path."""

from __future__ import annotations

import pytest
import torch

from shared.model import LoraSpec, build_model, load_tokenizer


def test_mean_pooling_ignores_padding(tiny_bert: str) -> None:
    model = build_model(tiny_bert, num_labels=3, lora=LoraSpec(r=2))
    model.eval()
    tok = load_tokenizer(tiny_bert)
    short = tok(["view iphone 12 手机 5999"], return_tensors="pt")
    padded = tok(["view iphone 12 手机 5999"], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        a = model(**short).logits
        b = model(**padded).logits
        hidden = model.base_model.model.bert(**padded).last_hidden_state
        mask = padded["attention_mask"].unsqueeze(-1).float()
        manual = model.base_model.model.classifier((hidden * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, manual, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_only_lora_and_head_are_trainable(tiny_bert: str, pooling: str) -> None:
    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(r=2), pooling=pooling)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("lora_B" in n for n in trainable) and any("classifier" in n for n in trainable)


def test_unknown_pooling_is_refused(tiny_bert: str) -> None:
    with pytest.raises(ValueError, match="pooling"):
        build_model(tiny_bert, num_labels=2, lora=LoraSpec(r=2), pooling="max")


def test_init_is_seeded_without_touching_the_global_rng(tiny_bert: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(tiny_bert, num_labels=2, lora=LoraSpec(r=2), init_seed=5)
    assert torch.equal(torch.rand(1), expected_next)  # the global stream is untouched
    b = build_model(tiny_bert, num_labels=2, lora=LoraSpec(r=2), init_seed=5)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
