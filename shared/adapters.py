"""The only place that knows which tensors may leave a merchant: the trained LoRA matrices and the head.

`AdapterSpec` lists the adapter keys with their shapes; `outgoing_guard` refuses any state that is not
exactly those keys, shapes and floating dtypes (base weights, embeddings, anything extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

AdapterState = dict[str, torch.Tensor]


class OutgoingGuardError(RuntimeError):
    """A state about to leave the merchant is not exactly the adapter: nothing is sent."""


@dataclass(frozen=True)
class AdapterSpec:
    """Expected adapter keys and shapes."""

    shapes: Mapping[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: torch.nn.Module) -> AdapterSpec:
        return cls({k: tuple(v.shape) for k, v in extract_adapter(model).items()})

    @property
    def num_bytes(self) -> int:
        """Bytes of the adapter in float32."""
        total = 0
        for shape in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += 4 * n
        return total

    def check(self, state: Mapping[str, torch.Tensor], *, what: str = "adapter") -> None:
        """Raise `OutgoingGuardError` unless `state` has exactly the spec's keys and shapes."""
        extra = sorted(set(state) - set(self.shapes))
        missing = sorted(set(self.shapes) - set(state))
        if extra or missing:
            raise OutgoingGuardError(
                f"{what} refused: unexpected tensors {extra[:5]}{'…' if len(extra) > 5 else ''}, "
                f"missing tensors {missing[:5]}{'…' if len(missing) > 5 else ''}; only LoRA matrices and the "
                "classifier head may leave a merchant"
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != self.shapes[key]:
                raise OutgoingGuardError(
                    f"{what} refused: {key} has shape {tuple(tensor.shape)}, expected {self.shapes[key]}"
                )
            if not tensor.is_floating_point():
                raise OutgoingGuardError(f"{what} refused: {key} has dtype {tensor.dtype}, expected float")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Opacus wraps the model in a GradSampleModule; PEFT needs the PeftModel inside.
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def frozen_lora(model: torch.nn.Module) -> tuple[str, ...]:
    """The LoRA matrices (`lora_A`, `lora_B`) that `model` keeps frozen while the rest trains, read
    from its parameters: `shared.model.freeze_for` froze them as the run's typed `LoraSpec` says
    (`frozen_lora`). A model that trains nothing (a PEFT folder loaded for inference) freezes none:
    its adapter is every tensor it holds."""
    params = list(_unwrap(model).named_parameters())
    if not any(p.requires_grad for _, p in params):
        return ()
    named = [(n, p) for n, p in params if "lora_" in n]
    return tuple(
        kind
        for kind in ("lora_A", "lora_B")
        if any(kind in n for n, _ in named) and not any(p.requires_grad for n, p in named if kind in n)
    )


def extract_adapter(model: torch.nn.Module) -> AdapterState:
    """A detached CPU float32 copy of the adapter (PEFT's state dict shares memory with the model):
    what the model trains, which is what a merchant sends. Frozen LoRA matrices (all of them in
    head-only mode, A in FFA-LoRA) are the same everywhere by construction, so they are neither sent
    nor expected."""
    inner = _unwrap(model)
    frozen = frozen_lora(inner)
    state = get_peft_model_state_dict(inner)
    return {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in state.items()
        if not any(part in k for part in frozen)
    }


def load_adapter(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors into `model` in place; the spec must match exactly."""
    inner = _unwrap(model)
    AdapterSpec.of(inner).check(state, what="incoming adapter")
    device = next(inner.parameters()).device
    result = set_peft_model_state_dict(
        inner,  # type: ignore[arg-type]
        {k: v.to(device) for k, v in state.items()},
    )
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise OutgoingGuardError(f"adapter keys not in the model: {unexpected[:5]}")


def outgoing_guard(state: Mapping[str, torch.Tensor], spec: AdapterSpec) -> AdapterState:
    """Check and return what may leave a merchant; raise `OutgoingGuardError` otherwise."""
    spec.check(state, what="outgoing update")
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
