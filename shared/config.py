"""The experiment configuration of a run, parsed once from `[tool.flwr.app.config]` / run config.

Keys are kebab-case, as in pyproject.toml. Unknown keys and wrong types are rejected with a message
naming the key. The server sends the parsed config to merchants in every round's ConfigRecord, so a
merchant trains exactly what the coordinator planned, while its privacy budget stays its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.model import LoraSpec
from shared.tasks import DEFAULT_CATEGORIES, TASK_NAMES, TaskSpec, get_task


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Experiment settings shared by the coordinator and every merchant in a run."""

    model_config = ConfigDict(alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True)

    task: str = "purchase-intent"
    eval_split: str = Field(
        "customer", pattern="^(customer|time)$", description="held-out customers or later sessions"
    )
    category_labels: str = Field(",".join(DEFAULT_CATEGORIES), description="category-intent's label list")
    backbone: str = Field("", description="HF model id or local folder; empty = packaged MiniLM-L6")
    num_rounds: int = Field(3, ge=1)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    min_train_nodes: int = Field(2, ge=1)
    fraction_evaluate: float = Field(1.0, gt=0.0, le=1.0)
    min_evaluate_nodes: int = Field(2, ge=1)
    min_available_nodes: int = Field(2, ge=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.03, gt=0.0, description="the head's AdamW rate")
    lora_learning_rate: float = Field(0.001, ge=0.0, description="LoRA matrices' rate; 0 = learning-rate")
    max_grad_norm: float = Field(0.5, gt=0.0)
    noise_multiplier: float = Field(0.0, ge=0.0, description="server's suggestion; 0 = merchant calibrates")
    max_length: int = Field(48, ge=8, le=512)
    pooling: str = Field("mean", pattern="^(mean|cls)$", description="head input: masked mean or [CLS]")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: str = "query,value"
    seed: int = 0
    round_timeout: float = Field(
        0.0, ge=0.0, description="seconds to wait for replies in a round; 0 = until each answers or drops"
    )
    resume: bool = Field(False, description="continue run-name from its last checkpoint")
    run_name: str = ""
    runs_dir: str = ""
    sim_root: str = ""
    sim_customers: int = Field(500, ge=20)
    sim_seed: int = 7

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASK_NAMES:
            raise ValueError(f"unknown task {value!r}; choose one of {', '.join(TASK_NAMES)}")
        return value

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> RunConfig:
        """Parse kebab-case values; raise `ValueError` naming each bad key and how to fix it."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as err:
            problems = []
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"])
                hint = (
                    "unknown key (see [tool.flwr.app.config] in pyproject.toml)"
                    if e["type"] == "extra_forbidden"
                    else e["msg"]
                )
                problems.append(f"{key}: {hint}")
            raise ValueError("invalid run config: " + "; ".join(problems)) from None

    def to_record(self) -> dict[str, int | float | str | bool]:
        """Kebab-case values, for a Flower ConfigRecord."""
        return self.model_dump(by_alias=True)

    @property
    def task_spec(self) -> TaskSpec:
        categories = tuple(c.strip() for c in self.category_labels.split(",") if c.strip())
        return get_task(self.task, categories)

    @property
    def lora(self) -> LoraSpec:
        modules = tuple(m.strip() for m in self.lora_target_modules.split(",") if m.strip())
        return LoraSpec(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=modules
        )
