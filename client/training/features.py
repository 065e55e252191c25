"""Frozen features for the linear-probe mode (`trainable=head`): the backbone runs once per example
per round, not once per example per step.

When only the classifier head is trained, everything below it is fixed during a round, so what the
head reads for an example (its pooled sentence embedding) is the same at every step. `head_inputs`
computes it once, with the model in eval mode (no dropout: the features are the deterministic
embedding the merchant's model would score with); the DP-SGD loop then runs on `HeadOnFeatures`,
and Opacus computes the head's per-example gradients from those features. The mechanism is unchanged
(same sampling, clipping and noise, `client.training.customer_dp`), so the ledger's charge is unchanged; only
the cost of an epoch falls from a BERT forward + backward per example to a matrix product, which is
what makes several local epochs affordable on a CPU.

Within a run (and across runs) the backbone does not change either, so the merchant's feature cache
(`client.training.feature_cache`) keeps each text's features on its disk: a later round computes only the
texts it has not seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

if TYPE_CHECKING:
    from client.ingest.encoded import Encoded
    from client.training.feature_cache import FeatureCache, FeatureSpace

log = logging.getLogger(__name__)

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
    model: torch.nn.Module,
    head: torch.nn.Module,
    data: Encoded,
    *,
    device: torch.device,
    chunk: int,
    cache: FeatureCache | None = None,
    runtime: str = "torch",
) -> Features:
    """Run `model` once over `data` (eval mode, `chunk` examples at a time) and keep what `head`
    receives: the pooled embedding whatever the pooling (mean, unit-length mean, [CLS]).

    With a `cache` (`client.training.feature_cache`), rows whose features it holds for this exact backbone,
    pooling, max length and token ids are read from it, the backbone runs over the others only (in
    their order, `chunk` at a time) and their features are stored. A hit is the tensor an earlier
    forward pass computed; when nothing hits, the passes are exactly those made without a cache. A
    cache that cannot be read or written is skipped (logged): it never fails a round.

    `runtime`: `torch`, or `onnx` / `onnx-int8` to compute the features with ONNX Runtime on the CPU
    (`client.training.onnx_backbone`: within 1e-4 of PyTorch in float32; int8 keeps the ranking, not the
    values). The cache keeps each runtime's features apart."""
    if runtime != "torch" and device.type != "cpu":
        log.warning("feature-runtime %s runs on the CPU only; features with torch on %s", runtime, device)
        runtime = "torch"
    compute = partial(_backbone_features, runtime=runtime)
    if cache is None or not cache.enabled or len(data) == 0:
        return Features(compute(model, head, data, None, device=device, chunk=chunk), data.labels)
    try:
        space = cache.space(
            model, head, max_length=int(data.input_ids.shape[1]), device=device, runtime=runtime
        )
        keys = space.keys(data)
        hit_rows, hit_values = space.lookup(keys)
        if hit_values is not None and hit_values.shape[1] != _head_width(head):
            raise ValueError(
                f"cached rows of width {hit_values.shape[1]}, the head reads {_head_width(head)}"
            )
    except Exception as err:  # the cache is an optimisation: a broken one is bypassed, never trusted
        log.warning("feature cache unavailable, computing every feature: %s: %s", type(err).__name__, err)
        return Features(compute(model, head, data, None, device=device, chunk=chunk), data.labels)
    if hit_values is None:
        values = compute(model, head, data, None, device=device, chunk=chunk)
        _store(space, keys, values)
        return Features(values, data.labels)
    missing = torch.ones(len(data), dtype=torch.bool)
    missing[hit_rows] = False
    miss_rows = torch.nonzero(missing).flatten()
    values = torch.empty((len(data), hit_values.shape[1]), dtype=hit_values.dtype)
    values[hit_rows] = hit_values
    if len(miss_rows):
        computed = compute(model, head, data, miss_rows, device=device, chunk=chunk)
        values[miss_rows] = computed.to(values.dtype)
        _store(space, [keys[i] for i in miss_rows.tolist()], computed)
    log.debug("feature cache: %d of %d rows hit", len(hit_rows), len(data))
    return Features(values, data.labels)


def _store(space: FeatureSpace, keys: list[bytes], values: torch.Tensor) -> None:
    try:
        space.store(keys, values)
    except Exception as err:  # a full disk must not fail the round: the features are in hand
        log.warning("feature cache: could not store %d rows: %s: %s", len(keys), type(err).__name__, err)


def _backbone_features(
    model: torch.nn.Module,
    head: torch.nn.Module,
    data: Encoded,
    rows: torch.Tensor | None,
    *,
    device: torch.device,
    chunk: int,
    runtime: str = "torch",
) -> torch.Tensor:
    """What `head` receives for `rows` of `data` (None: all of them), `chunk` rows per forward pass."""
    if runtime != "torch":
        from client.training.onnx_backbone import onnx_pooled_features

        return onnx_pooled_features(model, data, rows=rows, chunk=chunk, quantize=runtime == "onnx-int8")
    captured: list[torch.Tensor] = []

    def keep(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().cpu())

    count = len(data) if rows is None else len(rows)
    handle = head.register_forward_pre_hook(keep)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, count, chunk):
            part = slice(start, start + chunk) if rows is None else rows[start : start + chunk]
            model(**data.inputs(part, device))
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:  # no examples: the steps still run (noise only), on an empty feature matrix
        return torch.zeros((0, _head_width(head)))
    return torch.cat(captured)


def _head_width(head: torch.nn.Module) -> int:
    return next((m.in_features for m in head.modules() if isinstance(m, torch.nn.Linear)), 0)
