"""Configuration: file, environment overrides, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_as_documented():
    settings = load_settings(ROOT / "config.yaml")
    assert settings.database.url == "sqlite:///./data/mailintake.db"
    assert settings.tickets.key_prefix == "INQ"


def test_environment_overrides_nested_keys(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("tickets:\n  key_prefix: FAX\n  default_priority: high\n")
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", "sqlite:///x.db")
    monkeypatch.setenv("MAILINTAKE_TICKETS__KEY_PREFIX", "TEL")
    settings = load_settings(path)
    assert settings.database.url == "sqlite:///x.db"
    assert settings.tickets.key_prefix == "TEL"
    assert settings.tickets.default_priority == "high"  # the file's sibling key survives


def test_unknown_key_is_named_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("database:\n  url: sqlite:///x.db\n  ulr: typo\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:3: database.ulr: unknown key"


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("database:\n  url: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+:\d+: invalid YAML"):
        load_settings(path)


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")
