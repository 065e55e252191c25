"""Tests of shared/config.py: RunConfig defaults, validation and round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shared.config import HEAD_LOCAL_EPOCHS, LORA_LOCAL_EPOCHS, RunConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def toml_defaults() -> dict[str, object]:
    with PYPROJECT.open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_defaults_match_pyproject_key_by_key(toml_defaults: dict[str, object]) -> None:
    record = RunConfig().to_record()
    assert set(record) == set(toml_defaults)
    for key, value in toml_defaults.items():
        assert record[key] == value, key
        assert type(record[key]) is type(value), key


def test_pyproject_config_parses_to_defaults(toml_defaults: dict[str, object]) -> None:
    assert RunConfig.parse(toml_defaults) == RunConfig()


def test_unknown_key_is_rejected_and_named() -> None:
    with pytest.raises(ValueError, match="num-roundz"):
        RunConfig.parse({"num-roundz": 5})


def test_snake_case_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="bogus_key"):
        RunConfig.parse({"bogus_key": 1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-rounds", "abc"),
        ("num-rounds", 0),
        ("batch-size", 1.5),
        ("learning-rate", "fast"),
        ("fraction-train", 1.5),
        ("lora-dropout", 1.0),
        ("max-length", 4),
        ("task", "no-such-task"),
    ],
)
def test_bad_value_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        RunConfig.parse({key: value})


def test_error_names_every_bad_key() -> None:
    with pytest.raises(ValueError) as info:
        RunConfig.parse({"num-rounds": "abc", "batch-size": 0, "nope": 1})
    message = str(info.value)
    for key in ("num-rounds", "batch-size", "nope"):
        assert key in message


def test_parse_kebab_case_values() -> None:
    cfg = RunConfig.parse({"num-rounds": 7, "task": "next-behavior", "learning-rate": 0.5, "seed": 3})
    assert cfg.num_rounds == 7
    assert cfg.task == "next-behavior"
    assert cfg.learning_rate == 0.5
    assert cfg.seed == 3
    assert cfg.batch_size == 64  # untouched default


@pytest.mark.parametrize(
    ("values", "epochs"),
    [
        ({}, HEAD_LOCAL_EPOCHS),  # the head trains on features computed once per round
        ({"trainable": "lora+head"}, LORA_LOCAL_EPOCHS),  # every LoRA step is a BERT pass
        ({"local-epochs": 3}, 3),
        ({"local-epochs": 2, "trainable": "lora+head"}, 2),
    ],
)
def test_local_epochs_zero_means_the_trainables_default(values: dict[str, object], epochs: int) -> None:
    assert (HEAD_LOCAL_EPOCHS, LORA_LOCAL_EPOCHS) == (10, 1)
    assert RunConfig.parse(values).epochs == epochs


@pytest.mark.parametrize(
    ("values", "options"),
    [
        ({}, (10, 5, 2, 1)),  # 0: the default, and fewer where a merchant's budget fits no more
        ({"trainable": "lora+head"}, (1,)),
        ({"local-epochs": 3}, (3,)),  # set explicitly: exactly that, or refuse
    ],
)
def test_epoch_options_halve_the_default_down_to_one(
    values: dict[str, object], options: tuple[int, ...]
) -> None:
    assert RunConfig.parse(values).epoch_options == options


def test_to_record_round_trips() -> None:
    cfg = RunConfig.parse(
        {
            "task": "next-behavior",
            "num-rounds": 11,
            "fraction-train": 0.5,
            "lora-target-modules": "query,key,value",
            "run-name": "exp-1",
            "noise-multiplier": 1.25,
        }
    )
    record = cfg.to_record()
    assert all("_" not in key for key in record)
    assert record["num-rounds"] == 11
    assert RunConfig.parse(record) == cfg
    assert RunConfig.parse(RunConfig().to_record()) == RunConfig()


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen models
        cfg.num_rounds = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        ("query, value", ("query", "value")),
        ("query,value", ("query", "value")),
        (" query ,key, value ,", ("query", "key", "value")),
        ("dense", ("dense",)),
    ],
)
def test_lora_property_parses_target_modules(modules: str, expected: tuple[str, ...]) -> None:
    cfg = RunConfig.parse(
        {"lora-target-modules": modules, "lora-r": 4, "lora-alpha": 32, "lora-dropout": 0.1}
    )
    lora = cfg.lora
    assert lora.target_modules == expected
    assert lora.r == 4
    assert lora.alpha == 32
    assert lora.dropout == 0.1


def test_the_plan_and_the_coordinators_keys_split_the_config() -> None:
    from shared.config import COORDINATOR_ONLY_KEYS, PLAN_KEYS, MerchantPlan

    record = RunConfig().to_record()
    assert set(PLAN_KEYS) | set(COORDINATOR_ONLY_KEYS) == set(record)
    assert not set(PLAN_KEYS) & set(COORDINATOR_ONLY_KEYS)
    assert {"aggregation", "run-name", "runs-dir", "sim-root", "min-available-nodes"} <= set(
        COORDINATOR_ONLY_KEYS
    )
    assert {"task", "backbone", "num-rounds", "trainable", "max-grad-norm", "seed"} <= set(PLAN_KEYS)
    # a merchant parses the plan alone: a coordinator-only key in a message is an unknown key
    plan = MerchantPlan.parse(RunConfig().plan_record())
    assert type(plan) is MerchantPlan and plan.plan_record() == RunConfig().plan_record()
    with pytest.raises(ValueError, match="aggregation: unknown key"):
        MerchantPlan.parse({**RunConfig().plan_record(), "aggregation": "median"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("aggregation", "median"),
        ("trim-fraction", 0.1),
        ("server-optimizer", "fedadam"),
        ("round-timeout", 30.0),
        ("run-name", "other"),
        ("runs-dir", "/elsewhere"),
        ("sim-root", "/sim"),
        ("sim-seed", 99),
        ("fraction-train", 0.5),
        ("min-available-nodes", 7),
        ("resume", True),
    ],
)
def test_a_coordinator_only_key_never_changes_the_plan(key: str, value: object) -> None:
    assert RunConfig.parse({key: value}).plan_record() == RunConfig().plan_record()


def test_list_keys_are_parsed_once_and_cross_the_wire_as_one_string() -> None:
    cfg = RunConfig.parse({"leak-roles": " cart, fav ,", "lora-target-modules": ["query", "key"]})
    assert cfg.leak_roles == ("cart", "fav") and cfg.lora_target_modules == ("query", "key")
    assert cfg.to_record()["leak-roles"] == "cart,fav"
    assert cfg.to_record()["lora-target-modules"] == "query,key"
    assert cfg.lora.target_modules == ("query", "key")
    assert RunConfig.parse(cfg.to_record()) == cfg


@pytest.mark.parametrize(
    ("key", "value"),
    [("trainable", "lora"), ("lora-mode", "xla"), ("pooling", "max"), ("eval-split", "random")],
)
def test_choice_keys_are_typed_and_name_their_choices(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"{key}: Input should be"):
        RunConfig.parse({key: value})


def test_parsing_the_config_imports_no_torch() -> None:
    import subprocess

    script = "import sys, shared.config as c; c.RunConfig.parse({}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
