"""Settings from a TOML file and the environment (pydantic-settings), with errors that say what to fix.

Precedence, highest first: values given explicitly (command-line flags, node config), environment
variables (`<PREFIX><FIELD>`, e.g. `FEDBEHAVIOR_MERCHANT_MAX_EPSILON=4`), the TOML file, defaults.
TOML keys are kebab-case like Flower's (`max-epsilon`); snake_case is accepted too. Relative paths
are relative to the folder of the TOML file.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

S = TypeVar("S", bound="FileSettings")

_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("_FILE_VALUES", default=None)


def _snake(table: dict[str, Any]) -> dict[str, Any]:
    return {
        key.replace("-", "_"): _snake(value) if isinstance(value, dict) else value
        for key, value in table.items()
    }


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict with snake_case keys; a syntax error names the file and the line."""
    try:
        with path.open("rb") as handle:
            return _snake(tomllib.load(handle))
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"{path} is not valid TOML: {err}") from None


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the key, the source and the fix."""


def describe_errors(err: ValidationError, source: str, env_prefix: str = "") -> str:
    problems = []
    for e in err.errors():
        key = ".".join(str(part) for part in e["loc"]).replace("_", "-")
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}' (a typo? remove it)")
        elif e["type"] == "missing":
            problems.append(f"'{key}' is required")
        else:
            problems.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    hint = f"; environment variables {env_prefix}* override the file" if env_prefix else ""
    return f"invalid settings in {source}: " + "; ".join(problems) + hint


class FileSettings(BaseSettings):
    """Base class: subclasses set `env_prefix` in `model_config` and load with `load(file, **flags)`."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, env_nested_delimiter="__")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_values = _FILE_VALUES.get() or {}
        return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values)

    @classmethod
    def load(cls: type[S], file: Path | None = None, *, source: str = "", **explicit: Any) -> S:
        """Settings from `file` (if given and present), the environment and `explicit` (None = unset)."""
        values = read_toml(file) if file is not None and file.exists() else {}
        token = _FILE_VALUES.set(values)
        source = source or (str(file) if file is not None else "the environment")
        try:
            settings = cls(**{k: v for k, v in explicit.items() if v is not None})
        except ValidationError as err:
            prefix = str(cls.model_config.get("env_prefix", ""))
            raise SettingsError(describe_errors(err, source, prefix)) from None
        finally:
            _FILE_VALUES.reset(token)
        base = file.parent.resolve() if file is not None else Path.cwd()
        return settings.model_copy(update=_absolute_paths(settings, base))


def _absolute_paths(model: Any, base: Path) -> dict[str, Any]:
    """Relative `Path` fields (also in nested models) made absolute against `base`."""
    update: dict[str, Any] = {}
    fields: dict[str, FieldInfo] = type(model).model_fields
    for name in fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = (base / value.expanduser()).resolve()
        elif hasattr(type(value), "model_fields"):
            nested = _absolute_paths(value, base)
            if nested:
                update[name] = value.model_copy(update=nested)
    return update
