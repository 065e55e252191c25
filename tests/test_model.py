"""The classifier: mean pooling ignores padding; only LoRA and the head are trainable; any local path."""

from __future__ import annotations

import pytest
import torch

from shared.model import build_model, load_tokenizer
from shared.model_spec import LoraSpec


@pytest.mark.parametrize("pooling", ["mean-l2", "mean"])
def test_mean_pooling_ignores_padding(tiny_bert: str, pooling: str) -> None:
    model = build_model(tiny_bert, num_labels=3, lora=LoraSpec(trainable="lora+head", r=2), pooling=pooling)
    model.eval()
    tok = load_tokenizer(tiny_bert)
    short = tok(["view iphone 12 手机 5999"], return_tensors="pt")
    padded = tok(["view iphone 12 手机 5999"], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        a = model(**short).logits
        b = model(**padded).logits
        hidden = model.base_model.model.bert(**padded).last_hidden_state
        mask = padded["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        if pooling == "mean-l2":  # the default: unit length, as sentence-transformers' MiniLM
            pooled = pooled / pooled.norm(dim=1, keepdim=True)
            assert not torch.allclose(pooled, (hidden * mask).sum(1) / mask.sum(1))
        manual = model.base_model.model.classifier(pooled)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, manual, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean-l2", "mean", "cls"])
def test_only_lora_and_head_are_trainable(tiny_bert: str, pooling: str) -> None:
    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2), pooling=pooling)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("lora_B" in n for n in trainable) and any("classifier" in n for n in trainable)


def test_unknown_pooling_is_refused(tiny_bert: str) -> None:
    with pytest.raises(ValueError, match="pooling"):
        build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2), pooling="max")


def test_init_is_seeded_without_touching_the_global_rng(tiny_bert: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2), init_seed=5)
    assert torch.equal(torch.rand(1), expected_next)  # the global stream is untouched
    b = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2), init_seed=5)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na


# --- what is trained and sent: trainable = lora+head | head, lora-mode = lora | ffa -------------------

MODES = [
    # (trainable, mode, LoRA matrices trained and sent)
    ("lora+head", "lora", {"lora_A", "lora_B"}),
    ("head", "lora", set()),
    ("lora+head", "ffa", {"lora_B"}),
]


def _kinds(names: list[str]) -> set[str]:
    return {k for k in ("lora_A", "lora_B", "classifier") if any(k in n for n in names)}


@pytest.mark.parametrize(("trainable", "mode", "lora"), MODES)
def test_trainable_and_sent_tensors_per_mode(
    tiny_bert: str, trainable: str, mode: str, lora: set[str]
) -> None:
    from shared.adapters import AdapterSpec, extract_adapter

    spec = LoraSpec(r=2, trainable=trainable, mode=mode)
    model = build_model(tiny_bert, num_labels=2, lora=spec)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert _kinds(trained) == lora | {"classifier"}
    assert _kinds(list(extract_adapter(model))) == lora | {"classifier"}
    hidden, layers, labels = 32, 2, 2  # tests/tiny.py; LoRA on query and value
    head = 4 * (hidden * labels + labels)
    per_matrix = 4 * 2 * hidden * 2 * layers  # r·hidden floats per matrix, 2 modules × 2 layers
    assert AdapterSpec.of(model).num_bytes == head + per_matrix * len(lora)


def test_the_extractor_reads_what_the_builder_froze_and_nothing_set_on_the_model(tiny_bert: str) -> None:
    """What is sent follows the typed spec through the model's own parameters: no attribute is set
    on the model, and a model that trains nothing (loaded for inference) gives every tensor."""
    from shared.adapters import extract_adapter

    head_only = build_model(tiny_bert, num_labels=2, lora=LoraSpec(r=2, trainable="head"))
    assert not [name for name in vars(head_only) if "frozen" in name]
    assert _kinds(list(extract_adapter(head_only))) == {"classifier"}
    for param in head_only.parameters():
        param.requires_grad_(False)
    assert _kinds(list(extract_adapter(head_only))) == {"lora_A", "lora_B", "classifier"}


def test_ffa_a_is_the_same_everywhere_and_set_by_the_run_seed(tiny_bert: str) -> None:
    def a_matrices(init_seed: int, ffa_seed: int) -> dict[str, torch.Tensor]:
        spec = LoraSpec(trainable="lora+head", r=2, mode="ffa", ffa_seed=ffa_seed)
        model = build_model(tiny_bert, num_labels=2, lora=spec, init_seed=init_seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    merchant, server = a_matrices(0, 7), a_matrices(7, 7)  # merchants build with init 0, the server its seed
    assert merchant.keys() == server.keys() and all(torch.equal(merchant[k], server[k]) for k in merchant)
    other = a_matrices(0, 8)
    assert not any(torch.equal(merchant[k], other[k]) for k in merchant)
    bound = 1 / 32**0.5  # PEFT's Kaiming-uniform bound for fan-in 32
    assert all(0 < float(a.abs().max()) <= bound for a in merchant.values())


def _lora_pairs(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name → (B, A) of every LoRA-adapted projection."""
    params = dict(model.named_parameters())
    out = {}
    for name, b in params.items():
        if "lora_B" in name:
            out[name.split(".lora_B")[0]] = (
                b.detach().double(),
                params[name.replace("lora_B", "lora_A")].detach().double(),
            )
    return out


def _with_random_lora(tiny_bert: str, spec: LoraSpec, seed: int) -> torch.nn.Module:
    model = build_model(tiny_bert, num_labels=2, lora=spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name:  # what a merchant's training may change
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def test_ffa_averaging_of_b_averages_the_products_exactly(tiny_bert: str) -> None:
    from server.strategy import Update, fedavg
    from shared.adapters import extract_adapter, load_adapter

    for mode, exact in (("ffa", True), ("lora", False)):
        spec = LoraSpec(trainable="lora+head", r=2, mode=mode, ffa_seed=3)
        merchants = [_with_random_lora(tiny_bert, spec, seed) for seed in (1, 2, 3)]
        weights = [10.0, 30.0, 60.0]
        averaged = fedavg(
            [
                Update(f"m{i}", extract_adapter(m), w)
                for i, (m, w) in enumerate(zip(merchants, weights, strict=True))
            ]
        )
        server = build_model(tiny_bert, num_labels=2, lora=spec, init_seed=5)
        load_adapter(server, averaged)
        pairs = [_lora_pairs(m) for m in merchants]
        for module, (b, a) in _lora_pairs(server).items():
            products = sum(
                w * p[module][0] @ p[module][1] for w, p in zip(weights, pairs, strict=True)
            ) / sum(weights)
            assert torch.allclose(b @ a, products, atol=1e-6) is exact, (mode, module)


def test_ffa_dp_step_moves_b_and_head_but_never_a(tiny_bert: str) -> None:
    from client.training.loop import DPSettings, TrainSettings, train_dp
    from shared.adapters import extract_adapter
    from tests.test_dp_training import encode

    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, mode="ffa"))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    sent_before = extract_adapter(model)
    train_dp(
        model,
        encode(tiny_bert, 8),
        settings=TrainSettings(epochs=1, batch_size=8, learning_rate=0.05),
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        device=torch.device("cpu"),
        seed=3,
    )
    assert all(torch.equal(p, a_before[n]) for n, p in model.named_parameters() if "lora_A" in n)
    after = extract_adapter(model)
    assert after.keys() == sent_before.keys()
    assert all(not torch.equal(after[k], sent_before[k]) for k in after)  # every B and the head moved


def test_ffa_with_head_only_is_refused() -> None:
    with pytest.raises(ValueError, match="lora-mode"):
        LoraSpec(trainable="head", mode="ffa")
    with pytest.raises(ValueError, match="trainable"):
        LoraSpec(trainable="lora")
