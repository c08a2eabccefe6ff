"""`--help` is quick: it imports no database, SMTP or IMAP library; and it reads as text."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli import app

HEAVY = ("sqlalchemy", "alembic", "aiosmtpd", "imapclient")
COMMANDS = [
    [],
    ["ingest"],
    ["serve"],
    ["fetch"],
    ["failed", "list"],
    ["messages", "list"],
    ["rules", "test"],
    ["templates", "test"],
    ["templates", "suggest"],
]


def imported_modules(code: str) -> set[str]:
    """The modules `python -X importtime -c code` imported (its stderr names each)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY}


def test_importing_the_command_line_imports_no_heavy_library():
    modules = imported_modules("import cli")
    assert "cli" in modules
    assert heavy(modules) == set()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_imports_no_heavy_library(command):
    code = (
        "import sys, cli\n"
        f"sys.argv = ['mailintake', *{command!r}, '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
    )
    modules = imported_modules(code)
    assert "typer" in modules  # the help was really printed by the app
    assert heavy(modules) == set()


def test_importing_the_states_needs_no_sqlalchemy():
    assert heavy(imported_modules("import storage.states, config, ingest.extract")) == set()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_shows_no_python_types(command):
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for python_type in ("<bool>", "<str>", "<list[", "<int", "<path>", "<datetime>"):
        assert python_type not in result.output


def every_command(group: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    for name, command in group.commands.items():
        yield f"{path} {name}".strip(), command
        if hasattr(command, "commands"):
            yield from every_command(command, f"{path} {name}")


def test_every_command_says_what_it_does_in_one_short_sentence():
    commands = dict(every_command(typer.main.get_command(app)))
    assert "templates suggest" in commands or "rules test" in commands
    for name, command in commands.items():
        first = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert "\n" not in first, f"{name}: the first paragraph is one line"
        assert first.endswith("."), f"{name}: {first!r}"
        assert len(first) <= 90, f"{name}: {first!r}"
