"""Shared fixtures: a database on SQLite (temp file) and on PostgreSQL (own schema per run).

Under pytest-xdist each worker is a run of its own: its own PostgreSQL schema, temp dirs and
migrated SQLite template; servers listen on ports the system picks (tests/dovecot.py for IMAP).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from pipeline.process import PipelineContext
from storage import db
from storage.models import Base
from tests.rulesets import OUR_MTA
from tests.servers import ServeProcess

DATA = Path(__file__).parent / "data"
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get(
    "MAILINTAKE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def pg_unavailable_reason() -> str | None:
    engine = create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"no PostgreSQL at {PG_URL} ({type(exc).__name__}); set MAILINTAKE_TEST_PG_URL"
    finally:
        engine.dispose()
    return None


@pytest.fixture(scope="session")
def pg_schema_url() -> Iterator[str]:
    """A fresh schema in the test database, migrated to head, dropped at the end."""
    reason = pg_unavailable_reason()
    if reason:
        pytest.skip(reason)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # gw0, gw1, ... under xdist
    schema = f"mi_test_{worker}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    yield url
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@contextlib.contextmanager
def own_pg_database(prefix: str) -> Iterator[str]:
    """A PostgreSQL database of its own (not a schema), migrated; its name is yielded. For
    tests that need what is per database (notifications) or take the database away (rename it
    to `NAME_away`): both names are dropped at the end, their connections cut."""
    reason = pg_unavailable_reason()
    if reason:
        pytest.skip(reason)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine = db.make_engine(pg_database_url(name))
    db.upgrade(engine)
    engine.dispose()
    try:
        yield name
    finally:
        with admin.connect() as conn:
            for current in (name, f"{name}_away"):
                conn.execute(text(f"DROP DATABASE IF EXISTS {current} WITH (FORCE)"))
        admin.dispose()


def pg_database_url(name: str) -> str:
    """PG_URL with another database."""
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def shipped_cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`mailintake` with the shipped config, rules and templates on the test database:
    `shipped_cli("rules", "check")` gives typer's result."""
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.setenv("MAILINTAKE_DATABASE__URL", db_url)
    monkeypatch.setenv("MAILINTAKE_RULES__PATH", str(ROOT / "rules.yaml"))
    monkeypatch.setenv("MAILINTAKE_TEMPLATES__PATH", str(ROOT / "templates.yaml"))
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(app, ["--config", str(ROOT / "config.yaml"), *args])

    return run


def _truncate_all(engine: Engine) -> None:
    """Empty every table and restart the id sequences, as TRUNCATE ... RESTART IDENTITY does.

    DELETE is about ten times faster on tables this small (TRUNCATE makes new files); the
    foreign keys, which form cycles, are not checked meanwhile (session_replication_role,
    which needs a superuser, as the test server's `postgres` is: else TRUNCATE it is).
    """
    names = [t.name for t in Base.metadata.sorted_tables]
    sequences = text(
        "SELECT sequence_name FROM information_schema.sequences"
        " WHERE sequence_schema = current_schema()"
    )
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            for name in names:
                conn.execute(text(f"DELETE FROM {name}"))
            for sequence in conn.scalars(sequences).all():
                conn.execute(text(f"ALTER SEQUENCE {sequence} RESTART"))
    except ProgrammingError:  # not a superuser
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
def sqlite_migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite database migrated to head, made once per run; tests get a copy."""
    path = tmp_path_factory.mktemp("sqlite-template") / "migrated.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()  # the last connection checkpoints the WAL: the file alone is the database
    assert not path.with_name(f"{path.name}-wal").exists()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database URL, on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "mailintake.db"
        shutil.copyfile(request.getfixturevalue("sqlite_migrated"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("pg_schema_url")
    engine = db.make_engine(url)
    _truncate_all(engine)
    engine.dispose()
    yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = db.make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return db.make_session_factory(engine)


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database={"url": db_url}, authserv_id=OUR_MTA)


@pytest.fixture
def pipeline(settings: Settings, sessions: sessionmaker[Session]) -> PipelineContext:
    return PipelineContext(settings, sessions)


def corpus_dir(name: str) -> Path:
    path = CORPUS / name
    if not path.is_dir():
        pytest.skip(f"corpus folder {path} is absent (it lives beside the project in ../shared)")
    return path


# --- pytest-xdist -------------------------------------------------------------------------------

# Modules whose tests share an expensive module-scoped fixture (the corpus ingested once): one
# worker runs each of them whole. (xdist's own `--dist loadgroup` cannot be used: with pytest
# 9.2's structured node IDs it silently stops grouping, pytest-xdist issue #1386.)
RUN_WHOLE_ON_ONE_WORKER = {"tests/test_corpus.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, hand out the `slow` tests first (a stable sort: the rest keeps its order), so
    that no worker starts one of them while the other has nothing left to do."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`-n N` (load distribution): one test at a time to whichever worker is free, except the
    modules in RUN_WHOLE_ON_ONE_WORKER, each sent whole (first: they are the largest units)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WholeModulesOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in RUN_WHOLE_ON_ONE_WORKER else nodeid

    return WholeModulesOnOneWorker(config, log)


@pytest.fixture
def serve_processes() -> Iterator[list[ServeProcess]]:
    """`mailintake serve` children a test starts (append them): killed if still running."""
    started: list[ServeProcess] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait(10)
        if child.proc.stderr is not None:
            child.proc.stderr.close()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every name lookup, and every socket connect or send to a network address, is refused
    (Unix sockets may connect) and recorded in the list it yields: a test asserts it empty, so
    an attempt the code under test caught and hid still fails the test."""
    tried: list[Any] = []

    def guarded(name: str) -> Any:
        original = getattr(socket.socket, name)

        def refuse(self: socket.socket, address: Any, *args: Any) -> Any:
            if self.family != socket.AF_UNIX:
                tried.append(address)
                raise OSError(f"test: no network ({address!r})")
            return original(self, address, *args)

        return refuse

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        tried.append(host)
        raise OSError(f"test: no network (lookup of {host!r})")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, guarded(name))
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    yield tried
