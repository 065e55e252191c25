"""The experiment configuration of a run, parsed once from `[tool.flwr.app.config]` / run config.

Keys are kebab-case, as in pyproject.toml. Unknown keys and wrong types are rejected with a message
naming the key. The config is split by who reads it: `MerchantPlan` is what every merchant receives in
each round's ConfigRecord (and pins for the run), so a merchant trains exactly what the coordinator
planned, while its privacy budget stays its own; `RunConfig` adds the keys only the coordinator (or the
simulation that plays the merchants) reads, which never leave it (`plan_record` is what is sent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.model_spec import LoraMode, LoraSpec, Pooling, Trainable
from shared.tasks import DEFAULT_CATEGORIES, TASK_NAMES, TaskSpec, get_task

# local epochs per round when `local-epochs` is 0, chosen by the study (README, "Local epochs, batch
# and rounds"): the head trains on features computed once per round, so epochs are cheap; LoRA's
# epochs are each a BERT pass per step
HEAD_LOCAL_EPOCHS = 10
LORA_LOCAL_EPOCHS = 1


EvalSplit = Literal["customer", "time"]
Aggregation = Literal["fedavg", "robust", "trimmed-mean", "median"]
AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
ServerOptimizer = Literal["fedavg", "fedavgm", "fedadam"]
SERVER_OPTIMIZERS: tuple[ServerOptimizer, ...] = get_args(ServerOptimizer)


def _items(value: object) -> object:
    """A comma-separated string (how TOML, `--set` and Flower's ConfigRecord carry a list) or a list
    → a tuple of its non-empty, stripped items; anything else is left for pydantic to refuse."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(item).strip() for item in value if str(item).strip())
    return value


CommaList = Annotated[
    tuple[str, ...],
    BeforeValidator(_items),
    PlainSerializer(lambda items: ",".join(items), return_type=str),
]
"""A list key: parsed once into a tuple; written back as a comma-separated string (the form Flower's
run config and ConfigRecord carry)."""

Config = TypeVar("Config", bound="MerchantPlan")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs of `--set` options; values parsed as JSON when they can be (numbers,
    booleans), else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r} (e.g. --set num-rounds=5)")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def parse_cutoff(value: str) -> datetime:
    """An ISO date or date-time ("2026-02-01", "2026-02-01T12:00+01:00", "…Z"); naive means UTC,
    as for event timestamps."""
    text = value.strip()
    try:
        # Python 3.10's fromisoformat does not read a trailing "Z"
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(
            f"eval-cutoff must be an ISO date or date-time such as 2026-02-01 or 2026-02-01T00:00Z, "
            f"got {value!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class MerchantPlan(BaseModel):
    """What every merchant receives each round and pins for the run: the keys that decide what it
    computes. Nothing else of the run config leaves the coordinator."""

    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True, allow_inf_nan=False
    )

    task: str = Field(
        "purchase-intent",
        description="what the classifier predicts: purchase-intent (binary, from a session prefix with no "
        "cart/buy yet), next-behavior (the next event's role), category-intent (category of the next item "
        "acted on; top-3 accuracy reported), customer-label (the merchant's own labels file) or "
        "repeat-purchase (another buy within repeat-days)",
    )
    eval_split: EvalSplit = Field(
        "customer",
        description="customer: held-out customers (a hash of the customer id draws the merchant's "
        "eval-fraction of them); time: the same held-out customers, evaluated only on their sessions that "
        "start at or after eval-cutoff, while training customers train only on sessions that end before "
        "it. No customer is in both sets",
    )
    eval_cutoff: str = Field(
        "",
        description="eval-split=time (required there): a public ISO date or date-time (2026-02-01, "
        "2017-12-02T00:00+08:00; no zone = UTC); training sessions end before it, held-out customers' "
        "sessions start at or after it. Never a quantile of private session times, so adding a customer "
        "changes no other customer's examples",
    )
    category_labels: CommaList = Field(
        tuple(DEFAULT_CATEGORIES),
        description="category-intent's label list, comma-separated: a public taxonomy fixed for the run "
        "(other categories become `other`)",
    )
    customer_labels: CommaList = Field(
        (),
        description="customer-label's label names, comma-separated: fixed for the run, shared by every "
        "merchant",
    )
    leak_roles: CommaList = Field(
        ("cart", "buy"),
        description="roles that end a purchase-intent prefix, comma-separated (buy always does)",
    )
    repeat_days: float = Field(
        30.0, gt=0.0, description="repeat-purchase: window in days after the first buy"
    )
    backbone: str = Field(
        "",
        description="Hugging Face model id or local folder of a BERT; empty = the packaged MiniLM-L6 (a "
        "merchant loads only backbones its policy lists)",
    )
    num_rounds: int = Field(
        5, ge=1, le=1000, description="rounds (also the horizon merchants calibrate their noise for)"
    )
    local_epochs: int = Field(
        0,
        ge=0,
        le=1000,
        description="local DP-SGD epochs per round; 0 = the trainable's default "
        "(10 for head, whose backbone runs once per round; 1 for lora+head, a BERT pass per step), and a "
        "merchant whose budget fits no more under its max-noise-multiplier then trains 5, 2 or 1 rather "
        "than refuse; a value set here is trained exactly or refused",
    )
    batch_size: int = Field(
        64, ge=1, le=1_000_000, description="expected customers per DP-SGD step (Poisson-sampled)"
    )
    learning_rate: float = Field(0.1, gt=0.0, le=1e3, description="the head's AdamW rate")
    lora_learning_rate: float = Field(
        0.001, ge=0.0, le=1e3, description="LoRA matrices' rate; 0 = learning-rate"
    )
    max_grad_norm: float = Field(
        1.5,
        gt=0.0,
        le=1e6,
        description="clip of each customer's summed gradient; 1.5, not 1: a buyer's single-session head "
        "gradient has norm 2·(1 − p) on unit-length features, and clipping it to 1 biased the head "
        "towards 'no purchase' (the study, 'Clip and calibration')",
    )
    noise_multiplier: float = Field(
        0.0,
        ge=0.0,
        le=1e4,
        description="the coordinator's suggested noise multiplier; 0 = none. A merchant never goes "
        "below its own calibration and floor",
    )
    max_length: int = Field(
        48, ge=8, le=512, description="tokens per example; the most recent events that fit are kept"
    )
    pooling: Pooling = Field(
        "mean-l2",
        description="head input: mean-l2 = the attention-masked mean of the last hidden states scaled to "
        "unit length (the sentence embedding MiniLM is trained for); mean = the raw masked mean; cls = "
        "BERT's pooled [CLS]",
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA path")
    lora_target_modules: CommaList = Field(
        ("query", "value"), description="BERT modules that get LoRA matrices, comma-separated"
    )
    seed: int = Field(
        0, description="initial adapter, merchant sampling and FFA-LoRA's shared A (never the DP noise)"
    )
    examples_per_customer: int = Field(
        4,
        ge=1,
        le=64,
        description="customer-level DP-SGD: a sampled customer contributes up to this many of its "
        "sessions, summed into one gradient clipped to max-grad-norm (the privacy unit stays one customer; "
        "1 = per-example DP-SGD)",
    )
    trainable: Trainable = Field(
        "head",
        description="head = DP linear probe (LoRA frozen, only the head trained and sent; the default, see "
        "the study); lora+head = LoRA matrices + head",
    )
    lora_mode: LoraMode = Field(
        "lora",
        description="with lora+head; ffa = FFA-LoRA: A frozen at a seed-derived init shared by all, only B "
        "+ head trained and sent",
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASK_NAMES:
            raise ValueError(f"unknown task {value!r}; choose one of {', '.join(TASK_NAMES)}")
        return value

    @model_validator(mode="after")
    def _task_buildable(self) -> MerchantPlan:
        # building the task raises naming the key to fix (customer-labels, leak-roles, repeat-days)
        if self.task_spec.num_labels < 2:
            raise ValueError(f"task {self.task} needs at least two labels")
        _ = self.lora  # the adapter's spec too (lora-mode with trainable, target modules)
        return self

    @field_validator("eval_cutoff", mode="before")
    @classmethod
    def _iso_cutoff(cls, value: object) -> object:
        if isinstance(value, date):  # an unquoted TOML date or date-time (a datetime is a date)
            value = value.isoformat()
        if isinstance(value, str) and value:
            parse_cutoff(value)  # raises with the fix when it is not a date
        return value

    @model_validator(mode="after")
    def _time_split_has_cutoff(self) -> MerchantPlan:
        if self.eval_split == "time" and not self.eval_cutoff:
            raise ValueError(
                "eval-cutoff is required when eval-split=time: set a public ISO date/time, e.g. "
                'eval-cutoff="2026-02-01" (training sessions end before it, evaluation sessions start at '
                "or after it), or use eval-split=customer"
            )
        return self

    @classmethod
    def parse(cls: type[Config], values: Mapping[str, Any]) -> Config:
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
        """Kebab-case values, for a Flower ConfigRecord (list keys as comma-separated strings)."""
        return self.model_dump(by_alias=True)

    def plan_record(self) -> dict[str, int | float | str | bool]:
        """The plan's values only (no coordinator key), canonical: what is sent and pinned."""
        record = self.to_record()
        return {key: record[key] for key in sorted(PLAN_KEYS)}

    @property
    def epochs(self) -> int:
        """Local epochs per round: `local-epochs`, or the trainable's default when it is 0."""
        if self.local_epochs:
            return self.local_epochs
        return HEAD_LOCAL_EPOCHS if self.trainable == "head" else LORA_LOCAL_EPOCHS

    @property
    def epoch_options(self) -> tuple[int, ...]:
        """Local epochs a merchant may train per round, most first: only `local-epochs` when it is
        set; with 0, the trainable's default and its halvings down to 1 (10, 5, 2, 1), so a merchant
        whose budget cannot fit the default under its noise ceiling trains fewer epochs instead of
        refusing (`client.merchant.round_plan`)."""
        if self.local_epochs:
            return (self.local_epochs,)
        options = [self.epochs]
        while options[-1] > 1:
            options.append(options[-1] // 2)
        return tuple(options)

    @property
    def eval_cutoff_time(self) -> datetime | None:
        """`eval-cutoff` as an aware datetime (UTC when it names no zone); None when unset."""
        return parse_cutoff(self.eval_cutoff) if self.eval_cutoff else None

    @property
    def task_spec(self) -> TaskSpec:
        return get_task(
            self.task,
            self.category_labels,
            customer_labels=self.customer_labels,
            leak_roles=self.leak_roles,
            repeat_days=self.repeat_days,
        )

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            trainable=self.trainable,
            mode=self.lora_mode,
            ffa_seed=self.seed,
        )


class RunConfig(MerchantPlan):
    """The whole run config: the merchants' plan and the keys only the coordinator reads (sampling,
    aggregation, the server optimizer, timeouts, where runs are written) or the simulation that plays
    the merchants (`sim-*`). Only `plan_record()` is sent."""

    fraction_train: float = Field(
        1.0, gt=0.0, le=1.0, description="share of merchants sampled per training round"
    )
    min_train_nodes: int = Field(2, ge=1, description="fewest merchants sampled per training round")
    fraction_evaluate: float = Field(
        1.0, gt=0.0, le=1.0, description="share of merchants sampled per evaluation"
    )
    min_evaluate_nodes: int = Field(2, ge=1, description="fewest merchants sampled per evaluation")
    min_available_nodes: int = Field(2, ge=1, description="merchants to wait for before the first round")
    # --- the coordinator's bounds on what merchants send (server/strategy.py, server/robust.py) ---
    aggregation: Aggregation = Field(
        "robust",
        description="how accepted updates combine; robust (default) = coordinate-wise trimmed mean "
        "dropping at least one value at each end from 3 updates on, so one merchant cannot steer the "
        "step (weighted FedAvg below 3, and the log says so); fedavg = example-weighted mean with "
        "capped claims (bounds a rogue's share, not its direction); trimmed-mean drops trim-fraction "
        "only; median is the coordinate-wise median. See the robust aggregation guide",
    )
    trim_fraction: float = Field(0.25, ge=0.0, lt=0.5, description="trimmed-mean: dropped at each end")
    update_norm_factor: float = Field(3.0, gt=1.0, description="reject update norms above this x median")
    max_update_norm: float = Field(100.0, gt=0.0, description="absolute ceiling on an update's norm")
    max_weight_factor: float = Field(3.0, ge=1.0, description="example claims clipped to this x median")
    server_optimizer: ServerOptimizer = Field(
        "fedavg",
        description="applies the aggregated delta (post-processing, no privacy cost): fedavg, fedavgm "
        "(momentum) or fedadam",
    )
    server_learning_rate: float = Field(0.0, ge=0.0, description="0 = the server optimizer's default")
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="fedavgm's β, fedadam's β1")
    round_timeout: float = Field(
        0.0, ge=0.0, description="seconds to wait for replies in a round; 0 = until each answers or drops"
    )
    resume: bool = Field(
        False, description="continue run-name from its last checkpoint (`coordinator run --resume` sets it)"
    )
    run_name: str = Field(
        "", description="run folder name under runs-dir; empty = run-<UTC date-time>-<Flower run id>"
    )
    runs_dir: str = Field(
        "", description="folder of run folders; empty = ~/.fedbehavior/runs (make demo uses ./runs)"
    )
    sim_root: str = Field(
        "", description="simulation: folder of the merchant folders; empty = <run folder>/merchants"
    )
    sim_customers: int = Field(500, ge=20, description="simulation: customers per synthetic merchant")
    sim_seed: int = Field(7, description="simulation: seed of the synthetic merchants' data")


PLAN_FIELDS = tuple(MerchantPlan.model_fields)
"""The plan's fields (snake_case); `PLAN_KEYS` as the wire and TOML spell them."""
PLAN_KEYS = tuple(_kebab(name) for name in PLAN_FIELDS)
COORDINATOR_ONLY_KEYS = tuple(_kebab(name) for name in RunConfig.model_fields if name not in PLAN_FIELDS)
"""Run-config keys that never leave the coordinator: not part of the plan a merchant pins (a resumed or
re-tuned coordinator may change them without changing what any merchant computes)."""
