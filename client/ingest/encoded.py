"""Tokenised examples as tensors: what the training loop, the frozen features and their cache read
(`client.ingest.data` builds them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset


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

    def inputs(self, rows: torch.Tensor | slice, device: torch.device) -> dict[str, torch.Tensor]:
        """Model inputs of `rows` on `device`, cut after the last column any of them attends to.

        Examples are padded to `max-length`, but most behaviour texts are far shorter (the real
        clickstream's never exceed 24 of 48 tokens). Padding is masked everywhere (attention, the
        pooled mean, per-example gradients) and BERT's positions are absolute, so the cut batch gives
        the same outputs and gradients at a fraction of the cost (a test compares them)."""
        mask = self.attention_mask[rows]
        used = torch.nonzero(mask.any(dim=0)).flatten()
        width = int(used.max()) + 1 if len(used) else 1
        return {
            "input_ids": self.input_ids[rows][:, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
        }
