"""Frozen features for the linear-probe mode (`trainable=head`): the backbone runs once per example
per round, not once per example per step.

When only the classifier head is trained, everything below it is fixed during a round, so what the
head reads for an example (its pooled sentence embedding) is the same at every step. `head_inputs`
computes it once, with the model in eval mode (no dropout: the features are the deterministic
embedding the merchant's model would score with); the DP-SGD loop then runs on `HeadOnFeatures`,
and Opacus computes the head's per-example gradients from those features. The mechanism is unchanged
(same sampling, clipping and noise, `client.customer_dp`), so the ledger's charge is unchanged; only
the cost of an epoch falls from a BERT forward + backward per example to a matrix product, which is
what makes several local epochs affordable on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

if TYPE_CHECKING:
    from client.train import Encoded

HEAD_NAME = "classifier"  # BERT's sequence-classification head (PEFT wraps it, keeping the name)


@dataclass(frozen=True)
class Features:
    """What the head reads for every example (N × hidden, on the CPU) and the labels: the same
    `inputs` / `labels` interface as `Encoded`, so the DP-SGD loop takes either."""

    values: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def inputs(self, rows: torch.Tensor | slice, device: torch.device) -> dict[str, torch.Tensor]:
        return {"features": self.values[rows].to(device)}


class HeadOnFeatures(torch.nn.Module):
    """The model's own head module, called on precomputed features (its parameters are shared, so
    training this trains the model's head in place)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, **_: Any) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.head(features))


def head_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The classifier module when it holds every trainable parameter of `model` (head-only mode);
    None otherwise (LoRA or anything else below the head is trained, so features change per step)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        return None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == HEAD_NAME:
            own = {id(p) for p in module.parameters() if p.requires_grad}
            if own == trainable:
                return module
    return None


@torch.no_grad()
def head_inputs(
    model: torch.nn.Module, head: torch.nn.Module, data: Encoded, *, device: torch.device, chunk: int
) -> Features:
    """Run `model` once over `data` (eval mode, `chunk` examples at a time) and keep what `head`
    receives: the pooled embedding whatever the pooling (mean, unit-length mean, [CLS])."""
    captured: list[torch.Tensor] = []

    def keep(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().cpu())

    handle = head.register_forward_pre_hook(keep)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), chunk):
            model(**data.inputs(slice(start, start + chunk), device))
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:  # no examples: the steps still run (noise only), on an empty feature matrix
        width = next((m.in_features for m in head.modules() if isinstance(m, torch.nn.Linear)), 0)
        return Features(torch.zeros((0, width)), data.labels)
    return Features(torch.cat(captured), data.labels)
