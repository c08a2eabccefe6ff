"""docs/config.md documents every key of the configuration model (config.Settings) with its
real default and environment variable, and the shipped config.yaml uses only keys that exist and
shows their defaults (but for the few it deliberately sets for the example site)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from ruamel.yaml import YAML

from config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \| (?:`([A-Z0-9_]+)`|—) \|", re.MULTILINE)
# Keys the shipped config.yaml sets to the example site's value rather than the default.
SHIPPED_CHOICES = {"tickets.default_assignee", "detect.own_senders", "rules.path", "authserv_id"}


def default_of(field: FieldInfo) -> str:
    """The default as docs/config.md writes it: JSON (which YAML reads too)."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "(required)"
    value = field.get_default(call_default_factory=True)
    return json.dumps(value, default=str, ensure_ascii=False)


def model_keys(
    model: type[BaseModel] = Settings, prefix: str = "", env: str | None = "MAILINTAKE_"
) -> Iterator[tuple[str, str, str | None]]:
    """(dotted key, default, environment variable) of every key; items of a list of sections
    (`imap.accounts[].name`) have no variable of their own (the list's takes JSON)."""
    for name, field in model.model_fields.items():
        key, variable = f"{prefix}{name}", f"{env}{name.upper()}" if env else None
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from model_keys(kind, f"{key}.", f"{variable}__" if variable else None)
            continue
        yield key, default_of(field), variable
        item = get_args(kind)[0] if get_origin(kind) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):
            yield from model_keys(item, f"{key}[].", None)


def documented() -> dict[str, tuple[str, str | None]]:
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    return {key: (default, variable or None) for key, default, variable in ROW.findall(text)}


def test_every_key_is_documented_with_its_default_and_variable() -> None:
    expected = {key: (default, variable) for key, default, variable in model_keys()}
    found = documented()
    missing = sorted(set(expected) - set(found))
    assert not missing, f"docs/config.md lacks rows for: {missing}"
    unknown = sorted(set(found) - set(expected))
    assert not unknown, f"docs/config.md documents keys config.Settings lacks: {unknown}"
    wrong = {k: (found[k], expected[k]) for k in expected if found[k] != expected[k]}
    assert not wrong, f"documented (default, variable) differ from the model's: {wrong}"


def test_the_documented_variables_set_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILINTAKE_IMAP__STALLED_AFTER_SECONDS", "42")
    monkeypatch.setenv("MAILINTAKE_TIMEZONE", "UTC")
    settings = Settings()
    assert (settings.imap.stalled_after_seconds, settings.timezone) == (42, "UTC")


def yaml_keys(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a YAML mapping, lists of mappings as `key[].x`."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from yaml_keys(value, f"{key}.")
            continue
        yield key, value
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    yield from yaml_keys(item, f"{key}[].")


def test_shipped_config_uses_known_keys_and_shows_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("MAILINTAKE_")]:
        monkeypatch.delenv(name)
    load_settings(ROOT / "config.yaml")  # valid as shipped
    defaults = {key: default for key, default, _variable in model_keys()}
    shipped = dict(yaml_keys(YAML(typ="safe").load((ROOT / "config.yaml").read_text("utf-8"))))
    unknown = sorted(set(shipped) - set(defaults))
    assert not unknown, f"config.yaml has keys config.Settings lacks: {unknown}"
    differ = {
        key: (value, defaults[key])
        for key, value in shipped.items()
        if key not in SHIPPED_CHOICES and json.dumps(value, ensure_ascii=False) != defaults[key]
    }
    assert not differ, f"config.yaml shows values other than the defaults: {differ}"
