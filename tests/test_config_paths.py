"""Relative paths in a config file are relative to that file's folder, whatever the working
directory (an MTA's pipe, cron); a configured file that is missing stops the command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from config import load_settings
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
MAILINTAKE = str(Path(sys.executable).parent / "mailintake")  # the installed console script


def shipped_setup(folder: Path) -> Path:
    """The shipped config, rules and templates copied into `folder`; returns the config."""
    for name in ("config.yaml", "rules.yaml", "templates.yaml"):
        shutil.copy(ROOT / name, folder / name)
    return folder / "config.yaml"


def test_relative_paths_resolve_from_the_config_files_folder(tmp_path, monkeypatch):
    config = shipped_setup(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(config)
    assert settings.rules.path == tmp_path / "rules.yaml"
    assert settings.templates.path == tmp_path / "templates.yaml"
    assert settings.database.url == f"sqlite:///{tmp_path}/data/mailintake.db"


def test_an_mta_pipe_from_another_folder_uses_the_shipped_config_files(tmp_path):
    """As Postfix's pipe transport runs it: another working directory, the config by path."""
    config = shipped_setup(tmp_path)
    elsewhere = tmp_path / "spool"
    elsewhere.mkdir()
    command = [MAILINTAKE, "--config", str(config)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    mail = (DATA / "answering-service-iso2022jp.eml").read_bytes()
    piped = subprocess.run(
        [*command, "ingest", "-"], input=mail, cwd=elsewhere, env=env, capture_output=True
    )
    assert piped.returncode == 0, piped.stderr.decode()
    assert not (elsewhere / "data").exists()
    shown = subprocess.run(
        [*command, "tickets", "show", "INQ-1", "--json"], cwd=ROOT, env=env, capture_output=True
    )
    assert shown.returncode == 0, shown.stderr.decode()
    assert b'"source_kind": "phone"' in shown.stdout  # the templates file was read


def test_a_configured_templates_file_that_is_missing_stops_the_command(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("templates:\n  path: nowhere.yaml\n", encoding="utf-8")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    mail = tmp_path / "m.eml"
    mail.write_bytes((DATA / "answering-service.eml").read_bytes())
    run = subprocess.run(
        [MAILINTAKE, "--config", str(config), "ingest", str(mail)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
    )
    assert run.returncode == 2
    assert b"nowhere.yaml" in run.stderr
