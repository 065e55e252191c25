"""DP-SGD training and evaluation loops, with no Flower in sight.

The loop lives here, the mechanism (customer-level clipping + Gaussian noise over Poisson-sampled
customers) in `client.training.customer_dp`, accounting in `shared.privacy`. Mechanism and accounting
meet only through the `Charge` the caller writes to the ledger *before* the trained adapter leaves the
merchant; `StepPlan` is what both use, so the ledger records the q and step count that actually ran.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from opacus import GradSampleModule

from client.ingest.encoded import Encoded
from client.training.customer_dp import (
    CustomerIndex,
    clip_and_sum,
    noisy_mean,
    per_customer_gradients,
    poisson_sample,
)
from client.training.features import Features, HeadOnFeatures, head_inputs, head_module
from shared.metrics import accuracy, macro_f1, roc_auc, top_k_accuracy
from shared.model import trainable_parameters
from shared.progress import progress

if TYPE_CHECKING:
    from client.training.feature_cache import FeatureCache

# transformers 5 deprecates a property that PEFT still reads when wrapping a model; nothing to act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 64  # expected number of *customers* per step
    learning_rate: float = 1e-2
    lora_learning_rate: float | None = None  # None: same as learning_rate
    max_physical_batch: int = 128  # examples per forward pass: memory only, the result is the same
    frozen_features: bool = True  # head-only: run the backbone once per round (False: once per step)
    planned_customers: int | None = None  # the public size M of the plan; None: the exact count
    # CPU threads of the head's steps on frozen features (None: torch's setting). Those steps are small
    # matrix products: more threads buy nothing, and on a busy host they wait on each other (a cached
    # MiniLM round on 2 loaded cores: 17-21 s per merchant with 2 threads, 1.1-3.2 s with 1)
    head_threads: int | None = 1
    # what computes the frozen features: torch, or onnx / onnx-int8 (ONNX Runtime on the CPU)
    feature_runtime: str = "torch"


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class StepPlan:
    """What `train_dp` will do, and what the ledger is charged: customers Poisson-sampled at rate
    1/ceil(M/B), ceil(M/B) steps per epoch (Opacus's convention), B = batch size and M = `customers`,
    the size the plan is made for. A merchant's M is public (declared or a charged estimate), never
    its exact count: the data is then sampled at q whatever its size, and the noisy sum divided by
    q·M."""

    sample_rate: float
    steps: int
    epochs: int = 1
    customers: int = 1

    @classmethod
    def of(cls, n_customers: int, batch_size: int, epochs: int) -> StepPlan:
        if n_customers < 1:
            raise ValueError("no training customers")
        batches = math.ceil(n_customers / batch_size)
        return cls(sample_rate=1.0 / batches, steps=batches * epochs, epochs=epochs, customers=n_customers)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    examples: int
    customers: int
    sample_rate: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    macro_f1: float
    auc: float | None
    examples: int
    top3_accuracy: float | None = None


def train_dp(
    model: torch.nn.Module,
    data: Encoded,
    *,
    settings: TrainSettings,
    dp: DPSettings,
    device: torch.device,
    groups: torch.Tensor | None = None,
    seed: int | None = None,
    feature_cache: FeatureCache | None = None,
) -> TrainResult:
    """Fine-tune the trainable parameters of `model` in place with customer-level DP-SGD.

    When only the head is trained (`trainable=head`) and `settings.frozen_features`, the backbone
    runs once over `data` and the steps train the head on those features (`client.training.features`): the
    same mechanism, without a BERT pass per step. With a `feature_cache` (the merchant's own,
    `client.training.feature_cache`), it runs only over the examples whose features are not cached yet.

    `groups[i]` is the customer (0 … N-1) of example i; None means one customer per example, i.e.
    per-example DP-SGD. `seed` is for tests only: in production the sampling and the noise come from a
    fresh `secrets` seed every call, so no two merchants or rounds ever share noise. Opacus's hooks
    are removed before returning, so the same model object can be trained again next round.
    """
    customers = CustomerIndex.of(groups, len(data))
    size = settings.planned_customers if settings.planned_customers is not None else len(customers)
    plan = StepPlan.of(size, settings.batch_size, settings.epochs)
    optimizer = make_optimizer(model, settings)
    params = trainable_parameters(model)
    head = head_module(model) if settings.frozen_features else None
    steps_on: Encoded | Features = data
    if head is not None:  # a linear probe: the frozen backbone's features, computed once
        steps_on = head_inputs(
            model,
            head,
            data,
            device=device,
            chunk=settings.max_physical_batch,
            cache=feature_cache,
            runtime=settings.feature_runtime,
        )
    model.train()  # evaluation switched it off; the grad samplers need activations recorded
    sampler_model = GradSampleModule(
        model if head is None else HeadOnFeatures(head), loss_reduction="sum", batch_first=True
    )
    step = DPStep(
        sampler_model, params, optimizer, steps_on, customers, plan, dp, device, settings.max_physical_batch
    )
    rng_devices = [device] if device.type == "cuda" else []
    threads = settings.head_threads if head is not None and device.type == "cpu" else None
    try:
        with torch.random.fork_rng(devices=rng_devices), warnings.catch_warnings(), cpu_threads(threads):
            # a fresh seed in a forked RNG: never disturb, nor reuse, the global RNG
            torch.manual_seed(secrets.randbits(63) if seed is None else seed)
            # PyTorch warns that no input requires grad: expected, the embeddings are frozen
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            steps = progress(
                range(plan.steps), f"DP-SGD, {settings.epochs} epoch(s)", unit="steps", logger=log
            )
            losses = [loss for _ in steps if (loss := step.run()) is not None]
    finally:
        optimizer.zero_grad(set_to_none=True)
        sampler_model.to_standard_module()  # removes hooks and grad_sample attributes
    return TrainResult(
        loss=float(np.mean(losses)) if losses else math.nan,
        steps=plan.steps,
        examples=len(data),
        customers=len(customers),
        sample_rate=plan.sample_rate,
    )


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `n` inside the block (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def customer_groups(customer_ids: Sequence[str]) -> torch.Tensor:
    """`train_dp`'s `groups`: the customer (numbered 0 … N-1 in order of appearance) of every example."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(c, len(index)) for c in customer_ids], dtype=torch.long)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with one learning rate for the head and one for the LoRA matrices.

    Why two: at DP batch sizes the LoRA gradients are far below the clipping norm (the head's
    dominate), so their coordinates are mostly noise, which Adam rescales to full-size steps. A
    smaller LoRA rate keeps that random walk from scrambling the backbone's features. Optimizer
    choices are post-processing: they do not change the privacy guarantee.
    """
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    lora_lr = settings.learning_rate if settings.lora_learning_rate is None else settings.lora_learning_rate
    groups = [{"params": head, "lr": settings.learning_rate}, {"params": lora, "lr": lora_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.learning_rate)


@dataclass
class DPStep:
    """One noisy step: sample customers, clip each one's summed gradient, add noise, update."""

    model: torch.nn.Module  # a GradSampleModule with loss_reduction="sum"
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    data: Encoded | Features
    customers: CustomerIndex
    plan: StepPlan
    dp: DPSettings
    device: torch.device
    chunk: int

    def gradient(self, sampled: torch.Tensor) -> tuple[list[torch.Tensor], float, int]:
        """The private gradient for the `sampled` customers, their summed loss and example count."""
        rows, local = self.customers.gather(sampled)
        per_customer, loss = per_customer_gradients(
            self.model,
            self.params,
            self.data,
            rows,
            local,
            len(sampled),
            device=self.device,
            chunk=self.chunk,
        )
        summed = clip_and_sum(per_customer, self.dp.max_grad_norm)
        grads = noisy_mean(
            summed,
            noise_std=self.dp.noise_multiplier * self.dp.max_grad_norm,
            expected_customers=self.plan.sample_rate * self.plan.customers,
        )
        return grads, loss, len(rows)

    def run(self) -> float | None:
        """Take one step; its mean example loss, or None when no customer was sampled. An empty
        sample still takes the noise-only step: that is the mechanism the accountant analyses."""
        sampled = poisson_sample(len(self.customers), self.plan.sample_rate)
        grads, loss, n_rows = self.gradient(sampled)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss / n_rows if n_rows else None


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    data: Encoded,
    *,
    batch_size: int,
    device: torch.device,
    feature_cache: FeatureCache | None = None,
    feature_runtime: str = "torch",
) -> tuple[np.ndarray, float]:
    """Class probabilities for every example, and the mean cross-entropy loss.

    With a `feature_cache` and a head-only model, the head scores the (cached or computed) frozen
    features: the same logits as the whole model's, without a backbone pass for cached texts."""
    head = head_module(model) if feature_cache is not None else None
    scorer: torch.nn.Module = model
    rows: Encoded | Features = data
    if head is not None:
        rows = head_inputs(
            model, head, data, device=device, chunk=batch_size, cache=feature_cache, runtime=feature_runtime
        )
        scorer = HeadOnFeatures(head)
    model.eval()
    probs, total_loss = [], 0.0
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        logits = contained(scorer(**rows.inputs(sl, device)).logits.float())
        labels = data.labels[sl].to(device)
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
    model.train()
    if not probs:
        return np.zeros((0, num_labels(model))), math.nan
    return np.concatenate(probs), total_loss / len(data)


LOGIT_BOUND = 50.0
"""Released evaluations read logits clamped to ±LOGIT_BOUND (non-finite ones to 0): whatever adapter
the coordinator sends, scoring a customer never overflows, so a release never depends on whether
some customer's input pushed a logit past the float range."""


def contained(logits: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(logits, nan=0.0, posinf=LOGIT_BOUND, neginf=-LOGIT_BOUND).clamp(
        -LOGIT_BOUND, LOGIT_BOUND
    )


def num_labels(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_labels", 2))


def evaluate(model: torch.nn.Module, data: Encoded, *, batch_size: int, device: torch.device) -> EvalResult:
    """Accuracy, macro-F1, loss and (binary tasks) AUC of `model` on `data`."""
    probs, loss = predict(model, data, batch_size=batch_size, device=device)
    if len(data) == 0:
        return EvalResult(math.nan, math.nan, math.nan, None, 0)
    labels = data.labels.numpy()
    predicted = probs.argmax(axis=1)
    num_classes = probs.shape[1]
    auc = roc_auc(labels, probs[:, 1]) if num_classes == 2 else None
    top3 = top_k_accuracy(labels, probs, 3) if num_classes > 3 else None
    return EvalResult(
        loss=loss,
        accuracy=accuracy(labels, predicted),
        macro_f1=macro_f1(labels, predicted, num_classes),
        auc=auc,
        examples=len(data),
        top3_accuracy=top3,
    )
