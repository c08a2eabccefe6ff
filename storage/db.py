"""Engine and session factory. SQLite gets WAL, foreign keys, a busy timeout and full fsync."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class SchemaNotReady(RuntimeError):
    """The database is not at the schema version this code needs."""


def make_engine(url: str, *, busy_timeout_ms: int = 30_000, echo: bool = False) -> Engine:
    """An engine for `url`. Errors never quote statement parameters: they would put whole mails
    (and their personal data) into logs and into the ledger's `error` column."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, echo=echo, pool_pre_ping=True, hide_parameters=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        hide_parameters=True,
        connect_args={"timeout": busy_timeout_ms / 1000},
    )

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        # FULL: a committed (acknowledged) message survives a power cut, as the ack promises.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    return engine


def missing_sqlite_file(url: str) -> bool:
    """Whether `url` names a SQLite database file that does not exist (yet)."""
    parsed = make_url(url)
    database = parsed.database or ""
    in_a_file = database not in ("", ":memory:") and not database.startswith("file:")
    return parsed.get_backend_name() == "sqlite" and in_a_file and not Path(database).exists()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (`mailintake db upgrade`)."""
    command.upgrade(alembic_config(engine), "head")


def ensure_schema(engine: Engine) -> None:
    """Create an empty SQLite database on first start; refuse to run on an outdated schema."""
    current = current_revision(engine)
    if current == head_revision():
        return
    empty = not inspect(engine).get_table_names()
    if empty and engine.dialect.name == "sqlite":
        upgrade(engine)
        return
    raise SchemaNotReady(
        f"database schema is at {current or 'nothing'}, this version needs {head_revision()}: "
        "run `mailintake db upgrade`"
    )
