"""`mailintake doctor` on a good setup and on each kind of broken one, against the real
database (SQLite and PostgreSQL), real sockets and a real Dovecot."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli import app
from config import Settings
from storage import db
from tests.conftest import PG_URL, pg_unavailable_reason
from tests.dovecot import Dovecot, free_port
from tests.servers import ServiceThread
from tests.test_imap import PASSWORD, USER, started_dovecot

ROOT = Path(__file__).resolve().parents[1]
GOOD_RULES = """\
people: [yamada]
rules:
  - name: spoofed
    when: {not: {auth: {dmarc: pass}}}
    then: {drop: spoofed sender}
  - name: everything
    when: {always: true}
    then: {assignee: yamada}
"""


@pytest.fixture
def setup(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Setup:
    for name in ("MAILINTAKE_DATABASE__URL", "MAILINTAKE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return Setup(tmp_path, db_url)


class Setup:
    """A config file (and rules file) in a temp dir that a test breaks one way or another."""

    def __init__(self, folder: Path, db_url: str) -> None:
        self.folder = folder
        self.rules = folder / "rules.yaml"
        self.rules.write_text(GOOD_RULES, encoding="utf-8")
        self.config: dict[str, Any] = {
            "authserv_id": "mx.wine-importer.example.jp",
            "database": {"url": db_url},
            "rules": {"path": str(self.rules)},
            "templates": {"path": str(ROOT / "templates.yaml")},
            "smtp": {"port": free_port()},
            "http": {"port": free_port()},
        }

    def doctor(self, *extra: str) -> tuple[int, dict[str, dict[str, str]]]:
        path = self.folder / "config.yaml"
        with path.open("w", encoding="utf-8") as file:
            YAML().dump(self.config, file)
        result = CliRunner().invoke(app, ["--config", str(path), "doctor", "--json", *extra])
        report = json.loads(result.stdout)
        assert report["ok"] == (result.exit_code == 0), result.output
        return result.exit_code, {c["name"]: c for c in report["checks"]}

    def failures(self) -> dict[str, dict[str, str]]:
        code, checks = self.doctor()
        assert code == 1
        found = {name: c for name, c in checks.items() if c["outcome"] == "FAIL"}
        assert all(c["fix"] for c in found.values()), found
        return found


def outcomes(checks: dict[str, dict[str, str]]) -> dict[str, str]:
    return {name: c["outcome"] for name, c in checks.items()}


def test_a_good_setup_passes_on_both_databases(setup: Setup) -> None:
    code, checks = setup.doctor()
    assert code == 0, checks
    assert outcomes(checks) == {
        "config": "OK",
        "database": "OK",
        "database schema": "OK",
        "rules": "OK",
        "rules authserv_id": "OK",
        "templates": "OK",
        "port smtp": "OK",
        "port lmtp": "SKIP",
        "port http": "OK",
        "imap": "SKIP",
    }
    assert "mx.wine-importer.example.jp" in checks["rules authserv_id"]["detail"]


def test_the_human_table_names_each_check(setup: Setup) -> None:
    path = setup.folder / "config.yaml"
    setup.config["rules"]["path"] = str(setup.folder / "absent.yaml")
    with path.open("w", encoding="utf-8") as file:
        YAML().dump(setup.config, file)
    result = CliRunner().invoke(app, ["--config", str(path), "doctor"])
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "│ rules " in result.stdout


def test_a_bad_config_fails_and_skips_the_rest(setup: Setup) -> None:
    setup.config["smtp"]["prot"] = 25
    failures = setup.failures()
    assert list(failures) == ["config"]
    assert "smtp.prot" in failures["config"]["detail"]
    assert "did you mean `port`" in failures["config"]["detail"]


def test_an_unreachable_database(setup: Setup) -> None:
    closed = free_port()
    setup.config["database"]["url"] = f"postgresql+psycopg://postgres@127.0.0.1:{closed}/test"
    code, checks = setup.doctor()
    assert code == 1
    assert checks["database"]["outcome"] == "FAIL"
    assert "unreachable" in checks["database"]["detail"]
    assert checks["database schema"]["outcome"] == "SKIP"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with a table but no schema version (not `mailintake db upgrade`d)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE something_else (id INTEGER)"))
        engine.dispose()
        yield url
        return
    reason = pg_unavailable_reason()
    if reason:
        pytest.skip(reason)
    schema = f"mi_doctor_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_a_database_not_at_the_newest_migration(setup: Setup, unmigrated_url: str) -> None:
    setup.config["database"]["url"] = unmigrated_url
    failures = setup.failures()
    assert list(failures) == ["database schema"]
    assert f"needs {db.head_revision()}" in failures["database schema"]["detail"]
    assert failures["database schema"]["fix"] == "run `mailintake db upgrade`"


def test_broken_rules_are_refused_as_rules_check_refuses_them(setup: Setup) -> None:
    setup.rules.write_text(GOOD_RULES.replace("assignee: yamada", "assignee: yamda"), "utf-8")
    failures = setup.failures()
    assert list(failures) == ["rules"]
    assert "unknown assignee `yamda`" in failures["rules"]["detail"]
    checked = CliRunner().invoke(
        app, ["--config", str(setup.folder / "config.yaml"), "rules", "check", "--json"]
    )
    assert json.loads(checked.stdout)["errors"] == failures["rules"]["detail"].splitlines()


def test_auth_rules_without_authserv_id(setup: Setup) -> None:
    del setup.config["authserv_id"]
    failures = setup.failures()
    assert list(failures) == ["rules", "rules authserv_id"]
    assert "spoofed" in failures["rules authserv_id"]["detail"]
    assert "authserv_id" in failures["rules authserv_id"]["fix"]


def test_broken_templates(setup: Setup) -> None:
    broken = setup.folder / "templates.yaml"
    broken.write_text("templates:\n  - nme: x\n", encoding="utf-8")
    setup.config["templates"]["path"] = str(broken)
    failures = setup.failures()
    assert list(failures) == ["templates"]
    assert f"{broken}:2" in failures["templates"]["detail"]


def test_a_port_taken_by_another_program(setup: Setup) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        setup.config["smtp"]["port"] = taken.getsockname()[1]
        failures = setup.failures()
    assert list(failures) == ["port smtp"]
    assert "MAILINTAKE_SMTP__PORT" in failures["port smtp"]["fix"]


def test_ports_held_by_this_service_are_ok(
    setup: Setup, db_url: str, sessions: sessionmaker[Session]
) -> None:
    service = ServiceThread(Settings(database={"url": db_url}, smtp={"port": 0}), sessions)
    service.start()
    try:
        setup.config["smtp"]["port"] = service.port("smtp")
        setup.config["http"]["port"] = service.port("http")
        code, checks = setup.doctor()
    finally:
        service.stop()
    assert code == 0, checks
    assert "running mailintake" in checks["port smtp"]["detail"]
    assert "running mailintake" in checks["port http"]["detail"]


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with started_dovecot() as server:
        yield server


def imap_account(dovecot: Dovecot, **changes: Any) -> dict[str, Any]:
    account = {
        "name": "inquiry",
        "host": "127.0.0.1",
        "port": dovecot.port,
        "security": "none",
        "username": USER,
        "password": PASSWORD,
    }
    return account | changes


def test_imap_account_logs_in_and_its_folders_exist(setup: Setup, dovecot: Dovecot) -> None:
    setup.config["imap"] = {"accounts": [imap_account(dovecot)]}
    code, checks = setup.doctor()
    assert code == 0, checks
    assert checks["imap inquiry login"]["outcome"] == "OK"
    assert checks["imap inquiry folders"]["detail"] == "INBOX exist"


def test_imap_login_failing(setup: Setup, dovecot: Dovecot) -> None:
    setup.config["imap"] = {"accounts": [imap_account(dovecot, password="wrong")]}
    failures = setup.failures()
    assert list(failures) == ["imap inquiry login"]
    assert f"login as {USER}" in failures["imap inquiry login"]["detail"]
    assert "wrong" not in json.dumps(failures)


def test_imap_folder_missing(setup: Setup, dovecot: Dovecot) -> None:
    account = imap_account(dovecot, folders=["INBOX", "Orders"])
    setup.config["imap"] = {"accounts": [account]}
    failures = setup.failures()
    assert list(failures) == ["imap inquiry folders"]
    assert failures["imap inquiry folders"]["detail"] == "missing on the server: Orders"


def test_imap_server_down(setup: Setup) -> None:
    account = {
        "name": "inquiry",
        "host": "127.0.0.1",
        "port": free_port(),
        "security": "none",
        "username": USER,
        "password": PASSWORD,
    }
    setup.config["imap"] = {"accounts": [account]}
    failures = setup.failures()
    assert list(failures) == ["imap inquiry login"]
    assert "connection to 127.0.0.1" in failures["imap inquiry login"]["detail"]
