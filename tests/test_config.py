"""Configuration: file, environment overrides, and errors that say where: one format for
config.yaml, rules.yaml and templates.yaml (`file:line:column: dotted.key: problem`), and the
variable's name for a value that came from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from config import ConfigError, load_settings
from ingest.extract import load_templates
from rules.load import load_rules

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_as_documented():
    settings = load_settings(ROOT / "config.yaml")
    # relative to the config file's folder, whatever the working directory
    assert settings.database.url == f"sqlite:///{ROOT}/data/mailintake.db"
    assert settings.tickets.key_prefix == "INQ"


def test_environment_overrides_nested_keys(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("tickets:\n  key_prefix: FAX\n  default_priority: high\n")
    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", "sqlite:///x.db")
    monkeypatch.setenv("MAILINTAKE_TICKETS__KEY_PREFIX", "TEL")
    settings = load_settings(path)
    assert settings.database.url == f"sqlite:///{tmp_path}/x.db"  # beside the config file
    assert settings.tickets.key_prefix == "TEL"
    assert settings.tickets.default_priority == "high"  # the file's sibling key survives


def test_unknown_key_is_named_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("database:\n  url: sqlite:///x.db\n  ulr: typo\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:3:3: database.ulr: unknown key — did you mean `url`?"


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("database:\n  url: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+:\d+: invalid YAML"):
        load_settings(path)


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")


def test_every_problem_is_reported_in_file_order_in_plain_words(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "smtp:\n  require_tls: true\nimap:\n  accounts:\n    - {name: a, host: h}\n"
        "tickets: {key_prefix: lower}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:1:1: smtp: require_tls needs tls_cert and tls_key",
        f"{path}:5:7: imap.accounts.0.username: required key is missing",
        f"{path}:6:11: tickets.key_prefix: String should match pattern '^[A-Z][A-Z0-9]{{0,9}}$'",
    ]


@pytest.mark.parametrize(
    ("name", "text", "load", "expected", "suggestion"),
    [
        ("config.yaml", "smtp:\n  prot: 25\n", load_settings, "2:3: smtp.prot", "port"),
        (
            "rules.yaml",
            "rules:\n  - {name: a, when: {subjet: x}, then: {category: c}}\n",
            load_rules,
            "2:22: rules.0.when.subjet: rule `a`",
            "subject",
        ),
        (
            "templates.yaml",
            "templates:\n  - name: a\n    source_kind: fax\n    mach: {body: [x]}\n",
            load_templates,
            "4:5: templates.0.mach",
            "match",
        ),
    ],
)
def test_one_format_for_config_rules_and_templates(
    tmp_path, name, text, load, expected, suggestion
):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path)
    typo = next(str(p) for p in info.value.problems if "unknown key" in str(p))
    assert typo.startswith(f"{path}:{expected}: ")
    assert typo.endswith(": unknown key — did you mean `" + suggestion + "`?")


def test_an_unknown_key_from_the_environment_names_the_variable(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("smtp:\n  port: 2525\n", encoding="utf-8")
    monkeypatch.setenv("MAILINTAKE_SMTP__PROT", "25")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == (
        "environment MAILINTAKE_SMTP__PROT: smtp.prot: unknown key — did you mean `port`?"
    )


def test_a_bad_value_from_the_environment_names_the_variable_not_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("smtp:\n  port: 2525\n", encoding="utf-8")
    monkeypatch.setenv("MAILINTAKE_SMTP__PORT", "smtp")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith("environment MAILINTAKE_SMTP__PORT: smtp.port: ")


def test_malformed_json_in_an_environment_variable_is_a_config_error(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("tickets: {key_prefix: INQ}\n", encoding="utf-8")
    monkeypatch.setenv("MAILINTAKE_SMTP__AUTH_USERS", "{faxgw: secret}")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(
        "environment MAILINTAKE_SMTP__AUTH_USERS: smtp.auth_users: not valid JSON ("
    )


def test_malformed_json_in_the_environment_exits_2_from_the_cli(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("tickets: {key_prefix: INQ}\n", encoding="utf-8")
    monkeypatch.setenv("MAILINTAKE_SMTP__ACCEPT_DOMAINS", "wine-importer.example.jp")
    result = CliRunner().invoke(app, ["--config", str(path), "tickets", "list"])
    assert result.exit_code == 2, result.output
    assert "environment MAILINTAKE_SMTP__ACCEPT_DOMAINS: smtp.accept_domains: not valid JSON" in (
        " ".join(result.stderr.split())
    )


def test_a_file_that_is_not_utf8_names_the_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("tickets:\n  default_assignee: 山田\n".encode("shift_jis"))
    with pytest.raises(ConfigError, match=rf"^{path}:2:21: not UTF-8"):
        load_settings(path)


def test_the_time_zone_is_one_setting_asia_tokyo_by_default(tmp_path, monkeypatch):
    assert load_settings(ROOT / "config.yaml").zone.key == "Asia/Tokyo"
    path = tmp_path / "c.yaml"
    path.write_text("timezone: Europe/Berlin\n", encoding="utf-8")
    assert load_settings(path).zone.key == "Europe/Berlin"
    monkeypatch.setenv("MAILINTAKE_TIMEZONE", "America/New_York")
    assert load_settings(path).zone.key == "America/New_York"


def test_an_unknown_time_zone_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("timezone: Asia/Tokio\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == (
        f"{path}:1:1: timezone: unknown time zone `Asia/Tokio` (write an IANA name, e.g. "
        "Asia/Tokyo)"
    )
