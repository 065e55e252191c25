"""The merchant's own settings: where its data and state live, its privacy budget, its daemon.

They come from `merchant.toml` in the merchant folder (written by `fedbehavior merchant init`; the
older `merchant.json` is read too), environment variables `FEDBEHAVIOR_MERCHANT_*`, and the
SuperNode's node config, never from the coordinator: max-epsilon and delta are the merchant's decision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from shared.settings import FileSettings

if TYPE_CHECKING:
    from shared.privacy import Ledger
from shared.tasks import TASK_NAMES

SETTINGS_FILE = "merchant.json"
TOML_FILE = "merchant.toml"


class DaemonSettings(BaseModel):
    """How this merchant's SuperNode reaches the coordinator (`[daemon]` in merchant.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    superlink: str = Field("127.0.0.1:8000", description="coordinator address host:port")
    root_certificates: Path | None = Field(None, description="CA certificate that signed the SuperLink's")
    private_key: Path | None = Field(Path("keys/supernode"), description="SuperNode key (OpenSSH, 0600)")
    insecure: bool = Field(False, description="plaintext and unauthenticated: development only")
    runtime_port: int = Field(9094, gt=0, lt=65536, description="local port for the SuperNode's ClientApps")
    max_wait_s: float | None = Field(None, gt=0, description="give up reconnecting after this long")
    warm_executor: bool = Field(
        True,
        description="run each message in a fork of a process with the libraries already imported "
        "(SuperNode --isolation process + client.daemon.warm_exec); "
        "false: Flower's fresh process per message",
    )


class RunPolicy(BaseModel):
    """What a coordinator's run plan may ask of this merchant (`[policy]` in merchant.toml).

    A run's plan (its run config) is checked against these bounds at the run's first message and
    pinned: a later message of the same run with another plan is refused. Everything here is public
    (the merchant's own decision), so a refusal for a plan outside the policy reveals no customer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = Field(TASK_NAMES, description="tasks this merchant trains and evaluates")
    eval_splits: tuple[Literal["customer", "time"], ...] = Field(
        ("customer", "time"),
        description="held-out sets it accepts; a time split's cut-off is the plan's public date, pinned "
        "for the run (never a quantile of the merchant's sessions)",
    )
    backbones: tuple[str, ...] = Field(
        ("",),
        description='backbones the approved app may load ("" = the packaged MiniLM-L6); any other HF id or '
        "folder must be listed here",
    )
    max_rounds: int = Field(50, ge=1, description="most rounds one run may plan")
    max_local_epochs: int = Field(20, ge=1, description="most local epochs per round")
    max_batch_size: int = Field(4096, ge=1, description="largest expected customers per step")
    max_learning_rate: float = Field(10.0, gt=0.0, description="largest head or LoRA learning rate")
    max_examples_per_customer: int = Field(64, ge=1, description="most sessions per customer summed")
    max_adapter_norm: float = Field(
        1e4,
        gt=0.0,
        description="largest L2 norm of an incoming global adapter, checked before any data is read: a "
        "finite but huge head could otherwise overflow for some customers only",
    )


class MerchantSettings(FileSettings):
    """Where the merchant's data is, where its ledger goes, and how much privacy it may spend."""

    model_config = SettingsConfigDict(env_prefix="FEDBEHAVIOR_MERCHANT_")

    merchant_id: str = Field(min_length=1)
    data_dir: Path = Path(".")
    state_dir: Path = Path("state")
    max_epsilon: float = Field(8.0, gt=0.0)
    max_epsilon_per_run: float | None = Field(
        None,
        gt=0.0,
        description="most one run may add to ε, whatever its num-rounds (None: up to max-epsilon)",
    )
    delta: float = Field(1e-6, gt=0.0, lt=1e-2, description="well below 1/customers")
    accountant: Literal["pld", "rdp"] = Field(
        "pld",
        description="privacy accountant of the ledger: pld (tighter, dp-accounting) or rdp; a ledger "
        "keeps the accountant it started with",
    )
    min_noise_multiplier: float = Field(
        0.3, ge=0.0, le=1e4, description="floor, whatever the server suggests"
    )
    max_noise_multiplier: float = Field(
        10.0,
        gt=0.0,
        le=1e4,
        description="refuse rather than send an update drowned in noise (budget nearly spent)",
    )
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    eval_noise_multiplier: float = Field(
        20.0,
        gt=0.0,
        le=1e4,
        description="σ of the Gaussian noise on every released evaluation count (sensitivity 1): one "
        "evaluation alone costs ε 0.19 at δ 1e-6; a 3-round run's six releases raise training σ by 2% "
        "at max-epsilon 2 and 0.1% at 8 (PLD). Lower it (e.g. 5: +2% training σ at max-epsilon 8) for "
        "less noisy pooled metrics where the budget allows",
    )
    max_evaluations_per_run: int = Field(
        11, ge=0, description="evaluations answered per run; beyond it the merchant refuses (refused-budget)"
    )
    declared_customers: int | None = Field(
        None,
        ge=1,
        description="public size of the training set: fixes DP-SGD's q, steps and σ (never the exact "
        "count); unset: a DP estimate of it, charged once per run (σ size-noise-multiplier)",
    )
    size_noise_multiplier: float = Field(
        20.0, gt=0.0, le=1e4, description="σ of the Gaussian noise on the estimated training-set size"
    )
    budget_window_days: float = Field(
        30.0, gt=0.0, description="calendar window of the per-window caps (counted by the merchant)"
    )
    max_runs_per_window: int = Field(
        20, ge=1, description="runs this merchant joins per window, whatever run keys a coordinator sends"
    )
    max_epsilon_per_window: float | None = Field(
        None, gt=0.0, description="most ε the merchant adds per window (None: up to max-epsilon)"
    )
    policy: RunPolicy = RunPolicy()
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    feature_runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch",
        description="what computes head mode's frozen features: torch; onnx = ONNX Runtime on the CPU "
        "(the same features within 1e-4, faster); onnx-int8 = int8 weights (fastest; the ranking is kept, "
        "the values move: a run should not mix it with merchants on torch). Needs pip install "
        "'fedbehavior[onnx]'",
    )
    feature_cache_mb: int = Field(
        512,
        ge=0,
        description="disk bound (MiB) of the head-mode feature cache in <state-dir>/feature-cache: the "
        "frozen backbone's embedding of every text already seen, so later rounds and runs skip its forward "
        "pass (least recently used evicted first; private, never sent; 0 = off)",
    )
    daemon: DaemonSettings = DaemonSettings()

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.json"

    @property
    def feature_cache_dir(self) -> Path:
        return self.state_dir / "feature-cache"

    def open_ledger(self, privacy_unit: str = "customer") -> Ledger:
        """The merchant's ledger with its own budget settings (never the coordinator's)."""
        from shared.privacy import Ledger  # the accountants import opacus: only when a ledger is opened

        return Ledger.open(
            self.ledger_path,
            merchant_id=self.merchant_id,
            delta=self.delta,
            max_epsilon=self.max_epsilon,
            accountant=self.accountant,
            privacy_unit=privacy_unit,
        )

    @classmethod
    def from_merchant_dir(cls, folder: Path, **overrides: Any) -> MerchantSettings:
        """Settings of a merchant folder: `merchant.toml` (or `merchant.json`) there; paths relative to it."""
        folder = Path(folder).resolve()
        toml_path = folder / TOML_FILE
        if toml_path.exists():
            return cls.load(toml_path, **overrides)
        path = folder / SETTINGS_FILE
        values: dict[str, Any] = {"data_dir": folder, "state_dir": folder / "state"}
        if path.exists():
            try:
                values.update(json.loads(path.read_text(encoding="utf-8")))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        values.update(overrides)
        for key in ("data_dir", "state_dir"):  # relative paths are relative to the merchant folder
            if not Path(values[key]).is_absolute():
                values[key] = folder / values[key]
        source = str(path) if path.exists() else f"{folder} (no {TOML_FILE}: run fedbehavior merchant init)"
        return cls.load(None, source=source, **values)

    @classmethod
    def parse(cls, values: Mapping[str, Any], *, source: str) -> MerchantSettings:
        return cls.load(None, source=source, **values)


def from_node_config(node_config: Mapping[str, Any]) -> MerchantSettings:
    """Merchant settings from a SuperNode's node config.

    A deployed merchant sets `merchant-dir` (a folder with `merchant.json`) or the individual keys
    `merchant-id`, `data-dir`, `state-dir`, `max-epsilon`, `delta`. (A simulated merchant's settings
    come from the simulation, `simulations.run.SimulatedMerchants`.)
    """
    keys = {k.replace("-", "_"): v for k, v in node_config.items()}
    folder = keys.pop("merchant_dir", None)
    if folder is not None:
        return MerchantSettings.from_merchant_dir(Path(str(folder)), **keys)
    if "data_dir" in keys:
        keys.setdefault("state_dir", Path(str(keys["data_dir"])) / "state")
        return MerchantSettings.parse(keys, source="node config")
    raise ValueError(
        "this SuperNode has no merchant settings: start it with "
        "--node-config \"merchant-dir='/path/to/merchant'\" "
        "(a folder with merchant.json and events.jsonl)"
    )
