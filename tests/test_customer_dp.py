"""Customer-level DP-SGD on a tiny BERT: one clipped gradient per customer over all its examples."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from opacus import GradSampleModule

from client.ingest.encoded import Encoded
from client.training import loop as train_module
from client.training.customer_dp import CustomerIndex, clip_and_sum, per_customer_gradients
from client.training.loop import DPSettings, DPStep, StepPlan, TrainSettings, customer_groups, train_dp
from shared.adapters import extract_adapter
from shared.model import build_model, trainable_parameters
from shared.model_spec import LoraSpec
from shared.schema import Behavior, Event
from shared.tasks import Candidate, one_per_customer, up_to_k_per_customer
from tests.test_dp_training import encode, model_with_nonzero_b, per_example_grads

CPU = torch.device("cpu")


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def loop_clipped_sum(
    grads: list[list[torch.Tensor]], groups: list[int], clip: float, customers: list[int] | None = None
) -> tuple[list[torch.Tensor], list[float]]:
    """The reference: per customer, the sum of its per-example gradients (separate backward passes),
    clipped to `clip`; summed over `customers` (default all). Also each customer's unclipped norm."""
    customers = sorted(set(groups)) if customers is None else customers
    total = [torch.zeros_like(g) for g in grads[0]]
    norms = []
    for c in customers:
        mine = [grads[i] for i, g in enumerate(groups) if g == c]
        summed = [sum(gs[j] for gs in mine) for j in range(len(total))]
        n = norm(summed)  # type: ignore[arg-type]
        norms.append(n)
        factor = min(1.0, clip / (n + 1e-6))
        total = [t + factor * s for t, s in zip(total, summed, strict=True)]
    return total, norms


@contextmanager
def sampler(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        yield gsm
    finally:
        gsm.to_standard_module()


def module_clipped_sum(
    model: torch.nn.Module, data: Encoded, groups: torch.Tensor | None, clip: float, chunk: int = 3
) -> list[torch.Tensor]:
    """What `client.training.customer_dp` computes for every customer sampled, before noise."""
    customers = CustomerIndex.of(groups, len(data))
    rows, local = customers.gather(torch.arange(len(customers)))
    with sampler(model) as gsm:
        per_customer, _ = per_customer_gradients(
            gsm, trainable_parameters(model), data, rows, local, len(customers), device=CPU, chunk=chunk
        )
    return clip_and_sum(per_customer, clip)


def test_clipped_per_customer_gradient_equals_an_explicit_loop(tiny_bert: str) -> None:
    model = model_with_nonzero_b(tiny_bert)
    model.train()
    data = encode(tiny_bert, 9)
    groups = [2, 0, 0, 1, 2, 2, 3, 0, 1]  # interleaved, and split across chunks of 3
    grads = per_example_grads(model, data)
    clip = 0.5  # between the customers' norms (unit-length pooling keeps gradients small)
    expected, norms = loop_clipped_sum(grads, groups, clip)
    assert min(norms) < clip < max(norms), f"need clipped and unclipped customers, norms {norms}"
    got = module_clipped_sum(model, data, torch.tensor(groups), clip)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_a_customer_with_fifty_sessions_moves_the_sum_by_at_most_the_clip(tiny_bert: str) -> None:
    model = model_with_nonzero_b(tiny_bert)
    model.train()
    data = encode(tiny_bert, 55)
    groups = [0] * 50 + [1, 2, 3, 4, 5]
    clip = 0.05
    with_heavy = module_clipped_sum(model, data, torch.tensor(groups), clip, chunk=16)
    rest = slice(50, 55)
    without = module_clipped_sum(
        model,
        Encoded(data.input_ids[rest], data.attention_mask[rest], data.labels[rest]),
        torch.arange(5),
        clip,
    )
    moved = norm([a - b for a, b in zip(with_heavy, without, strict=True)])
    assert moved <= clip * (1 + 1e-5)
    assert moved == pytest.approx(clip, rel=1e-3)  # clipped, not dropped
    _, heavy_norm = loop_clipped_sum(per_example_grads(model, data), groups, clip, customers=[0])
    assert heavy_norm[0] > 10 * clip  # unclipped, the heavy customer would have moved it far more


def test_one_example_per_customer_is_per_example_clipping(tiny_bert: str) -> None:
    model = model_with_nonzero_b(tiny_bert)
    model.train()
    data = encode(tiny_bert, 6)
    clip = 0.05
    grads = per_example_grads(model, data)
    expected, norms = loop_clipped_sum(grads, list(range(6)), clip)
    assert max(norms) > clip
    for groups in (None, torch.arange(6)):
        got = module_clipped_sum(model, data, groups, clip)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_noise_is_sigma_times_clip_over_expected_customers_even_for_an_empty_sample(tiny_bert: str) -> None:
    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
    model.train()
    data = encode(tiny_bert, 40)
    params = trainable_parameters(model)
    customers = CustomerIndex.of(torch.arange(40) // 2, 40)  # 20 customers of 2 examples
    plan = StepPlan.of(len(customers), batch_size=5, epochs=1)  # q = 1/4, expected 5 customers
    sigma, clip = 2.0, 0.5
    with sampler(model) as gsm:
        step = DPStep(
            gsm,
            params,
            torch.optim.SGD(params, lr=0.0),
            data,
            customers,
            plan,
            DPSettings(sigma, clip),
            CPU,
            chunk=8,
        )
        torch.manual_seed(0)
        noisy, loss, rows = step.gradient(torch.zeros(0, dtype=torch.long))
        step.dp = DPSettings(0.0, clip)
        silent, _, _ = step.gradient(torch.zeros(0, dtype=torch.long))
    assert rows == 0 and loss == 0.0
    flat = torch.cat([g.flatten() for g in noisy])
    assert flat.numel() > 500  # std estimated to about 3%
    assert float(flat.std()) == pytest.approx(sigma * clip / 5.0, rel=0.1)
    assert all(bool((g == 0).all()) for g in silent)


def test_an_empty_poisson_sample_still_takes_the_noisy_step(
    tiny_bert: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module, "poisson_sample", lambda n, rate: torch.zeros(0, dtype=torch.long))
    moved = {}
    for sigma in (0.0, 1.0):
        model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
        data = encode(tiny_bert, 8)
        result = train_dp(
            model,
            data,
            settings=TrainSettings(batch_size=4),
            dp=DPSettings(sigma, 1.0),
            device=CPU,
            groups=torch.arange(8) // 2,
            seed=1,
        )
        assert result.steps == 1 and result.loss != result.loss  # one step, no example: loss is NaN
        # lora_B starts at zero and weight decay keeps zero at zero: only noise can move it
        moved[sigma] = any(
            bool(v.abs().sum() > 0) for k, v in extract_adapter(model).items() if "lora_B" in k
        )
    assert moved == {0.0: False, 1.0: True}


def test_lora_b_and_head_move_after_one_customer_level_step(tiny_bert: str) -> None:
    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
    before = extract_adapter(model)
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    data = encode(tiny_bert, 12)
    result = train_dp(
        model,
        data,
        settings=TrainSettings(batch_size=8, learning_rate=0.05),
        dp=DPSettings(noise_multiplier=0.5, max_grad_norm=1.0),
        device=CPU,
        groups=torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5]),
        seed=3,
    )
    assert (result.customers, result.examples, result.steps, result.sample_rate) == (6, 12, 1, 1.0)
    after = extract_adapter(model)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert {k for k in after if "lora_B" in k or "classifier" in k} <= moved
    for k, v in model.named_parameters():
        if not v.requires_grad:
            assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks and samples gone


def test_step_plan_counts_customers_not_examples(tiny_bert: str) -> None:
    model = build_model(tiny_bert, num_labels=2, lora=LoraSpec(trainable="lora+head", r=2, alpha=4))
    data = encode(tiny_bert, 30)
    result = train_dp(
        model,
        data,
        settings=TrainSettings(batch_size=4, epochs=2),
        dp=DPSettings(1.0, 1.0),
        device=CPU,
        groups=torch.arange(30) // 3,  # 10 customers of 3 examples
        seed=0,
    )
    # ceil(10 / 4) = 3 batches per epoch: q = 1/3, 6 steps (over examples it would be 1/8 and 16)
    assert (result.sample_rate, result.steps, result.customers) == (pytest.approx(1 / 3), 6, 10)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([0, 2], "each with at least one example"),
        ([0, -1], "each with at least one example"),
        ([0], "one customer"),
    ],
)
def test_customer_index_rejects_bad_groups(groups: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CustomerIndex.of(torch.tensor(groups), 2)


def test_customer_groups_number_customers_in_order() -> None:
    assert customer_groups(["b", "b", "a", "c", "a"]).tolist() == [0, 0, 1, 2, 1]


# --- choosing up to k examples per customer ---------------------------------------------------------


def candidates(sessions_per_customer: dict[str, int]) -> dict[str, list[Candidate]]:
    from datetime import datetime, timezone

    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    out = {}
    for customer, n in sessions_per_customer.items():
        out[customer] = [
            Candidate(
                customer,
                f"{customer}-s{i}",
                (
                    Event(
                        customer_id=customer,
                        session_id=f"{customer}-s{i}",
                        timestamp=t,
                        behavior=Behavior.VIEW,
                    ),
                ),
                i % 2,
            )
            for i in range(n)
        ]
    return out


def test_k_one_is_one_per_customer_and_k_bounds_each_customer() -> None:
    cands = candidates({"a": 1, "b": 5, "c": 12, "d": 0})
    for seed in range(5):
        assert up_to_k_per_customer(cands, cands, k=1, round_seed=seed) == one_per_customer(
            cands, cands, round_seed=seed
        )
    chosen = up_to_k_per_customer(cands, ["c", "a", "b", "b"], k=4, round_seed="r1")
    per = {c: [x.session_id for x in chosen if x.customer_id == c] for c in "abcd"}
    assert {c: len(v) for c, v in per.items()} == {"a": 1, "b": 4, "c": 4, "d": 0}
    assert all(len(set(v)) == len(v) for v in per.values())  # distinct sessions
    assert [x.customer_id for x in chosen] == sorted(x.customer_id for x in chosen)  # grouped
    assert len(up_to_k_per_customer(cands, cands, k=50, round_seed=0)) == 18  # everything, once


def test_k_choice_is_stable_varies_by_round_and_reaches_every_session() -> None:
    cands = candidates({"c": 10})
    first = up_to_k_per_customer(cands, ["c"], k=3, round_seed="run:1")
    assert up_to_k_per_customer(cands, ["c"], k=3, round_seed="run:1") == first
    seen = set()
    for r in range(40):
        seen |= {x.session_id for x in up_to_k_per_customer(cands, ["c"], k=3, round_seed=f"run:{r}")}
    assert len(seen) == 10
    with pytest.raises(ValueError, match="examples-per-customer"):
        up_to_k_per_customer(cands, ["c"], k=0, round_seed=0)


def test_batches_are_cut_to_their_longest_row_with_the_same_outputs(tiny_bert: str) -> None:
    """`Encoded.inputs` drops the padding columns no row of the batch uses; logits (and so the DP
    gradients above, which go through it) equal those of the full max-length width."""
    model = model_with_nonzero_b(tiny_bert)
    model.eval()
    data = encode(tiny_bert, 6, max_length=48)
    lengths = data.attention_mask.sum(dim=1)
    rows = torch.tensor([0, 3, 4])
    cut = data.inputs(rows, CPU)
    assert cut["input_ids"].shape[1] == int(lengths[rows].max()) < 48
    full = model(input_ids=data.input_ids[rows], attention_mask=data.attention_mask[rows]).logits
    torch.testing.assert_close(model(**cut).logits, full, rtol=1e-5, atol=1e-5)
    every = data.inputs(slice(0, 6), CPU)
    assert every["input_ids"].shape[1] == int(lengths.max())
    assert torch.equal(every["input_ids"], data.input_ids[:, : int(lengths.max())])


def test_the_default_clip_leaves_a_buyers_single_session_head_gradient_nearly_whole() -> None:
    """Why `max-grad-norm` is 1.5: on unit-length features the two-logit head's per-example gradient
    (weights and bias) has norm exactly 2·|p₁ − y|, so a clip of 1 shrank every confident-miss
    buyer's gradient (p₁ ≈ 0.1: norm 1.8) to 0.55 of it while leaving non-buyers whole, which biased the
    head towards 'no purchase' (README, "Clip and calibration")."""
    from shared.config import RunConfig

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 2)
    for label in (0, 1):
        x = torch.nn.functional.normalize(torch.randn(16), dim=0)
        head.zero_grad()
        logits = head(x)
        torch.nn.functional.cross_entropy(logits.unsqueeze(0), torch.tensor([label])).backward()
        p1 = float(torch.softmax(logits, dim=0)[1])
        grads = [head.weight.grad, head.bias.grad]
        assert grads[0] is not None and grads[1] is not None
        assert norm([grads[0], grads[1]]) == pytest.approx(2 * abs(p1 - label), rel=1e-6)
    clip = RunConfig.parse({}).max_grad_norm
    assert clip == 1.5 and clip >= 2 * (1 - 0.25)  # a buyer scored p₁ ≥ 0.25 is never clipped
