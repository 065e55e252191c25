"""Local, non-DP fine-tuning of a global model: the starting model, the head's inputs, early-stopped AdamW.

`client.evaluation.personalise` uses it on a merchant's own training customers; nothing here is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from client.ingest.encoded import Encoded
from client.training.loop import TrainSettings, make_optimizer, predict
from shared.adapters import load_adapter
from shared.config import MerchantPlan
from shared.metrics import roc_auc
from shared.model import build_model, freeze_for, resolve_backbone
from shared.model_spec import TRAINABLE, Trainable
from shared.trained import ADAPTER_CONFIG, read_run_config

TRAIN_MODES: tuple[Trainable, ...] = TRAINABLE

# --- settings and scores ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PersonaliseSettings:
    """How the merchant fine-tunes. Every field is a local choice; none is sent anywhere."""

    train: Trainable = "head"  # "head" (LoRA kept as received) or "lora+head"
    epochs: int = 20  # the most; the epoch kept is the best on validation
    patience: int = 4  # stop after this many epochs without a better validation score
    learning_rate: float = 0.01  # the head's AdamW rate
    lora_learning_rate: float = 0.001
    batch_size: int = 32
    validation_fraction: float = 0.2  # of the *training* customers: the held-out ones never train
    examples_per_customer: int = 4  # sessions per training customer (validation: one, like held-out)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1 or self.examples_per_customer < 1:
            raise ValueError("--epochs, patience, --batch-size and examples per customer must be ≥ 1")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation-fraction must be in (0, 1), got {self.validation_fraction}")
        if self.learning_rate <= 0 or self.lora_learning_rate <= 0:
            raise ValueError("--learning-rate and --lora-learning-rate must be positive")


@dataclass(frozen=True)
class Scores:
    """AUC (binary tasks with both labels present, else None) and mean log loss."""

    auc: float | None
    loss: float
    examples: int

    @classmethod
    def of(cls, labels: np.ndarray, probs: np.ndarray) -> Scores:
        picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
        auc = roc_auc(labels, probs[:, 1]) if probs.shape[1] == 2 else None
        return cls(auc, float(-np.log(picked).mean()), len(labels))

    def key(self) -> tuple[float, float]:
        """Larger is better: AUC first where there is one (the goal's metric), then lower loss."""
        return (self.auc if self.auc is not None else -math.inf, -self.loss)


# --- the starting model -----------------------------------------------------------------------------


def start_model(
    folder: Path, mode: Trainable, device: torch.device
) -> tuple[torch.nn.Module, MerchantPlan, str]:
    """The global model, trainable as `mode` asks: (model, run config, backbone). A run's `final/`
    loads as its backbone + adapter; an export becomes the backbone of a fresh LoRA adapter (B = 0:
    the same function), so the result is a `final/` over the export folder."""
    folder = Path(folder)
    if (folder / "final" / ADAPTER_CONFIG).exists():
        folder = folder / "final"
    if not folder.is_dir() or not any(folder.glob("*.json")):
        raise FileNotFoundError(
            f"--global {folder} is not a model folder: pass a run's final/, an export, or omit it to use "
            "the global model this merchant kept (<state_dir>/global/latest.json)"
        )
    cfg = read_run_config(folder)
    exported = not (folder / ADAPTER_CONFIG).exists()
    backbone = str(folder.resolve()) if exported else resolve_backbone(cfg.backbone)
    # every LoRA tensor in the spec, so the saved adapter loads whole; frozen below as `mode` asks
    full = replace(cfg.lora, trainable="lora+head", mode="lora")
    model = build_model(
        backbone, num_labels=cfg.task_spec.num_labels, lora=full, device=device, pooling=cfg.pooling
    )
    if not exported:
        from safetensors.torch import load_file

        load_adapter(model, load_file(str(folder / "adapter_model.safetensors")))
    freeze_for(model, replace(full, trainable=mode))
    return model, cfg.model_copy(update={"backbone": backbone}), backbone


def _head(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_submodule("base_model.model.classifier")
    return head


@torch.no_grad()
def head_inputs(
    model: torch.nn.Module, data: Encoded, device: torch.device, batch: int = 128
) -> torch.Tensor:
    """What the classifier head reads for every example (the pooled vector): with the backbone and
    LoRA frozen, head-only training needs the backbone once, not once per epoch."""
    captured: list[torch.Tensor] = []
    hook = _head(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().cpu()))
    try:
        model.eval()
        for start in range(0, len(data), batch):
            sl = slice(start, start + batch)
            model(**data.inputs(sl, device))
    finally:
        hook.remove()
    return torch.cat(captured) if captured else torch.zeros(0)


@dataclass
class Fitted:
    """The trained model's best epoch and the validation score after every epoch (0 = the global)."""

    best_epoch: int
    history: list[dict[str, float | None]] = field(default_factory=list)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fine_tune(
    model: torch.nn.Module,
    fit: Encoded,
    validation: Encoded,
    settings: PersonaliseSettings,
    device: torch.device,
) -> Fitted:
    """Plain (non-DP) AdamW on `fit`, early-stopped on `validation`; `model` ends at its best epoch."""
    head_only = settings.train == "head"
    if head_only:  # the head is linear in what it reads: train it on cached inputs
        fit_x, val_x = head_inputs(model, fit, device), head_inputs(model, validation, device)
    optimizer = make_optimizer(
        model,
        TrainSettings(learning_rate=settings.learning_rate, lora_learning_rate=settings.lora_learning_rate),
    )
    generator = torch.Generator().manual_seed(settings.seed)
    val_labels = validation.labels.numpy()

    def validate() -> Scores:
        if head_only:
            with torch.no_grad():
                _head(model).eval()
                probs = torch.softmax(_head(model)(val_x.to(device)).float(), dim=-1).cpu().numpy()
            return Scores.of(val_labels, probs)
        return Scores.of(val_labels, predict(model, validation, batch_size=128, device=device)[0])

    best, best_state, fitted = validate(), trainable_state(model), Fitted(0)
    fitted.history.append({"epoch": 0, "auc": best.auc, "loss": best.loss})
    for epoch in range(1, settings.epochs + 1):
        model.train()
        for rows in torch.randperm(len(fit), generator=generator).split(settings.batch_size):
            labels = fit.labels[rows].to(device)
            if head_only:
                logits = _head(model)(fit_x[rows].to(device))
            else:
                logits = model(**fit.inputs(rows, device)).logits
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        score = validate()
        fitted.history.append({"epoch": epoch, "auc": score.auc, "loss": score.loss})
        if score.key() > best.key():
            best, best_state, fitted.best_epoch = score, trainable_state(model), epoch
        elif epoch - fitted.best_epoch >= settings.patience:
            break
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in best_state.items():
            params[name].copy_(value)
    model.eval()
    return fitted
