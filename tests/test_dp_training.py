"""DP-SGD on a tiny BERT: per-sample gradients, clipping, which weights move, repeated rounds."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from torch.utils.data import DataLoader

from client.ingest.encoded import Encoded
from client.training.customer_dp import CustomerIndex
from client.training.loop import DPSettings, DPStep, StepPlan, TrainSettings, evaluate, train_dp
from shared.adapters import extract_adapter, load_adapter
from shared.model import build_model, load_tokenizer, trainable_parameters
from shared.model_spec import LoraSpec

TEXTS = [
    "view iphone 12 手机 phones 5999 ; search phone price",
    "search shoes ideas ; view anta kt8 shoes 599",
    "fav lego technic car toys 899 ; view rubik cube toy 39",
    "review 5 stars rice cooker home 399 great quality",
    "search 手机 包邮 ; view xiaomi 13 phone 3999 ; view xiaomi 13 phone 3999",
    "view oreo cookies snacks 25",
]


def encode(backbone: str, n: int, max_length: int = 24) -> Encoded:
    tokenizer = load_tokenizer(backbone)
    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    labels = torch.tensor([i % 2 for i in range(n)])
    return Encoded(batch["input_ids"], batch["attention_mask"], labels)


def model_with_nonzero_b(backbone: str) -> torch.nn.Module:
    model = build_model(backbone, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would make every gradient of A zero
                p.normal_(0, 0.5)
    return model


def per_example_grads(model: torch.nn.Module, data: Encoded) -> list[list[torch.Tensor]]:
    out = []
    params = trainable_parameters(model)
    for i in range(len(data)):
        model.zero_grad(set_to_none=True)
        logits = model(
            input_ids=data.input_ids[i : i + 1], attention_mask=data.attention_mask[i : i + 1]
        ).logits
        torch.nn.functional.cross_entropy(logits, data.labels[i : i + 1], reduction="sum").backward()
        out.append([p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    return out


def test_per_sample_gradients_equal_per_example_loop(tiny_bert: str) -> None:
    model = model_with_nonzero_b(tiny_bert)
    model.train()
    data = encode(tiny_bert, 5)
    expected = per_example_grads(model, data)
    gsm = GradSampleModule(model, loss_reduction="sum")
    logits = gsm(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    torch.nn.functional.cross_entropy(logits, data.labels, reduction="sum").backward()
    params = trainable_parameters(model)
    assert len(params) > 2
    for j, p in enumerate(params):
        assert p.grad_sample is not None and p.grad_sample.shape[0] == len(data)
        for i in range(len(data)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)
    gsm.to_standard_module()


def test_per_example_mechanism_matches_opacus_dp_optimizer(tiny_bert: str) -> None:
    """One customer per example: our clip + sum + divide equals Opacus's own DP-SGD step (noise 0)."""
    model = model_with_nonzero_b(tiny_bert)
    model.train()
    data = encode(tiny_bert, 4)
    clip = 0.05
    grads = per_example_grads(model, data)
    assert max(float(torch.sqrt(sum((g**2).sum() for g in gs))) for gs in grads) > clip, "clip inactive"
    params = trainable_parameters(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    plan = StepPlan.of(len(data), batch_size=len(data), epochs=1)  # q = 1: every customer sampled
    step = DPStep(
        gsm,
        params,
        torch.optim.SGD(params, lr=0.0),
        data,
        CustomerIndex.of(None, len(data)),
        plan,
        DPSettings(noise_multiplier=0.0, max_grad_norm=clip),
        torch.device("cpu"),
        chunk=3,
    )
    ours, _, _ = step.gradient(torch.arange(len(data)))
    gsm.to_standard_module()

    before = [p.detach().clone() for p in params]
    loader = DataLoader(data.dataset(), batch_size=len(data))
    engine = PrivacyEngine(accountant="rdp")
    private, dp_opt, dp_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(params, lr=1.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
    )
    for input_ids, mask, labels in dp_loader:
        logits = private(input_ids=input_ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        dp_opt.step()
    private.to_standard_module()
    for b, p, g in zip(before, params, ours, strict=True):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-4, atol=1e-7)


def test_one_dp_step_moves_lora_b_and_head_only(tiny_bert: str) -> None:
    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
    base_before = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    adapter_before = extract_adapter(model)
    data = encode(tiny_bert, 8)
    result = train_dp(
        model,
        data,
        settings=TrainSettings(epochs=1, batch_size=8, learning_rate=0.05),
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        device=torch.device("cpu"),
        seed=3,
    )
    assert result.steps == StepPlan.of(8, 8, 1).steps == 1
    after = extract_adapter(model)
    moved = {k for k in after if not torch.equal(after[k], adapter_before[k])}
    assert {k for k in after if "lora_B" in k} <= moved
    assert {k for k in after if "classifier" in k} <= moved
    for k, v in model.named_parameters():
        if not v.requires_grad:
            assert torch.equal(v, base_before[k]), f"frozen weight {k} changed"


def test_model_trains_again_after_a_round_and_noise_is_not_fixed(tiny_bert: str) -> None:
    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
    data = encode(tiny_bert, 16)
    settings = TrainSettings(epochs=1, batch_size=8, learning_rate=0.05)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    start = extract_adapter(model)
    results = []
    for _ in range(2):  # "hooks added twice" would fail the second call
        load_adapter(model, start)
        train_dp(model, data, settings=settings, dp=dp, device=torch.device("cpu"))
        results.append(extract_adapter(model))
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    key = next(k for k in start if "classifier" in k and k.endswith("weight"))
    assert not torch.equal(results[0][key], results[1][key]), "production noise must not repeat"
    metrics = evaluate(model, data, batch_size=8, device=torch.device("cpu"))
    assert metrics.examples == 16 and 0.0 <= metrics.accuracy <= 1.0 and metrics.auc is not None


def test_fixed_seed_reproduces_training(tiny_bert: str) -> None:
    data = encode(tiny_bert, 16)
    outs = []
    for _ in range(2):
        model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
        train_dp(
            model,
            data,
            settings=TrainSettings(batch_size=8),
            dp=DPSettings(1.0, 1.0),
            device=torch.device("cpu"),
            seed=11,
        )
        outs.append(extract_adapter(model))
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k])


def test_step_plan_matches_opacus_sampling() -> None:
    plan = StepPlan.of(n_customers=500, batch_size=64, epochs=2)
    assert plan.steps == 16 and plan.sample_rate == pytest.approx(1 / 8)


def test_optimizer_gives_lora_its_own_learning_rate(tiny_bert: str) -> None:
    from client.training.loop import make_optimizer

    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
    opt = make_optimizer(model, TrainSettings(learning_rate=0.01, lora_learning_rate=0.001))
    by_lr = {g["lr"]: g["params"] for g in opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("classifier" in names[id(p)] for p in by_lr[0.01])
    assert all("lora_" in names[id(p)] for p in by_lr[0.001])
    assert sum(len(g) for g in by_lr.values()) == len(trainable_parameters(model))
