"""What the model is and what a run trains, as typed values (no torch): the run config holds them,
the model builder (`shared.model.build_model`, `freeze_for`) reads them, and what is trained is what
a merchant sends (`shared.adapters.extract_adapter` reads the model the builder froze).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Pooling = Literal["mean-l2", "mean", "cls"]
"""The head's input: the masked mean of the last hidden states scaled to unit length, the raw mean,
or BERT's pooled [CLS]."""
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)

Trainable = Literal["head", "lora+head"]
"""`head`: a DP linear probe (LoRA frozen at B = 0, only the head trained and sent); `lora+head`:
the LoRA matrices and the head."""
TRAINABLE: tuple[Trainable, ...] = get_args(Trainable)

LoraMode = Literal["lora", "ffa"]
"""`lora` trains A and B; `ffa` (FFA-LoRA) freezes every A at a seed-derived initialisation shared by
all and trains B only."""
LORA_MODES: tuple[LoraMode, ...] = get_args(LoraMode)


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """LoRA hyper-parameters and what is trained (and so sent). `target_modules` names the
    attention projections to adapt.

    `trainable`: `lora+head` trains LoRA and the classifier head; `head` is a DP linear probe: the
    LoRA matrices stay frozen at their initialisation (B = 0, so the backbone is unchanged) and only
    the head is trained and sent. `mode`: `lora` trains A and B; `ffa` (FFA-LoRA, Sun et al. 2024)
    freezes every A at an initialisation drawn from `ffa_seed` (the run's seed: the same at every
    merchant and the server) and trains B only, so averaging B averages the products B·A exactly and
    half the LoRA upload is saved.
    """

    trainable: Trainable  # no default here: the run config's `trainable` is the one default
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    mode: LoraMode = "lora"
    ffa_seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora-r must be ≥ 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora-target-modules must name at least one module, e.g. 'query,value'")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.mode not in LORA_MODES:
            raise ValueError(f"lora-mode must be one of {', '.join(LORA_MODES)}, got {self.mode!r}")
        if self.mode == "ffa" and self.trainable == "head":
            raise ValueError(
                'lora-mode="ffa" trains LoRA B: it needs trainable="lora+head" (or lora-mode="lora")'
            )

    @property
    def frozen_lora(self) -> tuple[str, ...]:
        """The LoRA matrices this spec keeps frozen (and so never sends): both in head-only mode, A in
        FFA-LoRA, none otherwise. The classifier head always trains."""
        if self.trainable == "head":
            return ("lora_A", "lora_B")
        return ("lora_A",) if self.mode == "ffa" else ()
