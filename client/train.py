"""DP-SGD training and evaluation loops, with no Flower in sight.

Mechanism (Opacus: per-sample clipping + Gaussian noise, Poisson sampling) lives here; accounting lives
in `shared.privacy`. The two meet only through the `Charge` the caller writes to the ledger *before*
the trained adapter leaves the merchant.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from shared.metrics import accuracy, macro_f1, roc_auc, top_k_accuracy

# transformers 5 deprecates a property that PEFT still reads when wrapping a model; nothing to act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples as tensors on the CPU."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.input_ids, self.attention_mask, self.labels)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 1e-2
    lora_learning_rate: float | None = None  # None: same as learning_rate


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class StepPlan:
    """What Opacus will actually do: sample rate 1/len(loader), len(loader) steps per epoch."""

    sample_rate: float
    steps: int

    @classmethod
    def of(cls, n_examples: int, batch_size: int, epochs: int) -> StepPlan:
        if n_examples < 1:
            raise ValueError("no training examples")
        batches = math.ceil(n_examples / batch_size)
        return cls(sample_rate=1.0 / batches, steps=batches * epochs)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    examples: int


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
    seed: int | None = None,
) -> TrainResult:
    """Fine-tune the trainable parameters of `model` in place with DP-SGD.

    `seed` is for tests only: in production the sampling and the noise come from a fresh
    `secrets` seed every call, so no two merchants or rounds ever share noise. Opacus's hooks are
    removed before returning, so the same model object can be trained again next round.
    """
    model.train()  # evaluation switched it off; Opacus needs activations recorded
    loader = DataLoader(data.dataset(), batch_size=settings.batch_size, shuffle=False)
    optimizer = make_optimizer(model, settings)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: our noise is seeded per call from `secrets` instead
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private_model, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
        )
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), warnings.catch_warnings():
            # a fresh seed in a forked RNG: never disturb, nor reuse, the global RNG
            torch.manual_seed(secrets.randbits(63) if seed is None else seed)
            # PyTorch warns that no input requires grad: expected, the embeddings are frozen
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses, steps = _run_epochs(private_model, dp_optimizer, dp_loader, settings.epochs, device)
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        private_model.to_standard_module()  # removes hooks and grad_sample attributes (after zero_grad)
    return TrainResult(loss=float(np.mean(losses)) if losses else math.nan, steps=steps, examples=len(data))


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


def _run_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    device: torch.device,
) -> tuple[list[float], int]:
    criterion = torch.nn.CrossEntropyLoss()
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        for input_ids, attention_mask, labels in loader:
            steps += 1
            optimizer.zero_grad(set_to_none=True)
            if labels.numel() == 0:  # Poisson sampling can draw an empty batch
                continue
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            loss = criterion(logits, labels.to(device))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses, steps


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: Encoded, *, batch_size: int, device: torch.device
) -> tuple[np.ndarray, float]:
    """Class probabilities for every example, and the mean cross-entropy loss."""
    model.eval()
    probs, total_loss = [], 0.0
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        logits = model(
            input_ids=data.input_ids[sl].to(device), attention_mask=data.attention_mask[sl].to(device)
        ).logits.float()
        labels = data.labels[sl].to(device)
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
    model.train()
    if not probs:
        return np.zeros((0, 0)), math.nan
    return np.concatenate(probs), total_loss / len(data)


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
