"""Service configuration: `config.yaml` overlaid by `MAILINTAKE_*` environment variables.

The YAML file is read with ruamel.yaml so that a validation error can point at the line of the
offending key. Environment variables win over the file (`MAILINTAKE_DATABASE__URL` overrides
`database.url`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

DEFAULT_CONFIG_PATH = Path("config.yaml")
CONFIG_ENV_VAR = "MAILINTAKE_CONFIG"


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(Section):
    url: str = "sqlite:///./data/mailintake.db"
    echo: bool = False
    busy_timeout_ms: int = Field(default=30_000, ge=0)


class TicketSettings(Section):
    key_prefix: str = Field(default="INQ", pattern=r"^[A-Z][A-Z0-9]{0,9}$")
    default_assignee: str | None = None
    default_priority: str = "normal"
    default_category: str = "inquiry"


class IntakeSettings(Section):
    max_message_bytes: int = Field(default=25 * 1024 * 1024, gt=0)


class Settings(BaseSettings):
    """The whole configuration; see the commented `config.yaml` for every key."""

    model_config = SettingsConfigDict(
        env_prefix="MAILINTAKE_", env_nested_delimiter="__", extra="forbid"
    )

    database: DatabaseSettings = DatabaseSettings()
    tickets: TicketSettings = TicketSettings()
    intake: IntakeSettings = IntakeSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; environment variables take precedence.
        return (env_settings, init_settings)


class ConfigError(Exception):
    """A configuration file that cannot be used; the message says where and why."""


def load_yaml(path: Path) -> Any:
    """Parse a YAML file keeping line information (ruamel round-trip types)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return YAML(typ="rt").load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc


def line_of(data: Any, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest key of `loc` found in ruamel round-trip `data`."""
    line = None
    node = data
    for part in loc:
        lc = getattr(node, "lc", None)
        try:
            if lc is not None and isinstance(part, str) and hasattr(node, "keys"):
                line = lc.key(part)[0] + 1
            elif lc is not None and isinstance(part, int):
                line = lc.item(part)[0] + 1
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
    return line


def describe_validation_error(exc: ValidationError, data: Any, path: Path) -> str:
    """One line per problem: `file:line: dotted.key: what is wrong`."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(data, loc)
        where = f"{path}:{line}" if line else str(path)
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: {key}: {message}")
    return "\n".join(lines)


def config_path(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_settings(path: Path | None = None) -> Settings:
    """Load settings from `path` (or $MAILINTAKE_CONFIG, or ./config.yaml if it exists).

    A missing default file is fine (built-in defaults apply); a missing explicit file is not.
    """
    chosen = config_path(path)
    explicit = path is not None or CONFIG_ENV_VAR in os.environ
    data: Any = {}
    if chosen.exists() or explicit:
        data = load_yaml(chosen) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{chosen}: the top level must be a mapping of sections")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, data, chosen)) from exc
