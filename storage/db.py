"""Engine and session factory. SQLite gets WAL, foreign keys, a busy timeout and full fsync;
PostgreSQL gets connect, network, statement and lock timeouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.writelock import connection_factory

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class SchemaNotReady(RuntimeError):
    """The database is not at the schema version this code needs."""


def make_engine(
    url: str,
    *,
    echo: bool = False,
    busy_timeout_ms: int = 30_000,
    connect_timeout_seconds: int | None = None,
    statement_timeout_ms: int | None = None,
    lock_timeout_ms: int | None = None,
    pool_timeout_seconds: float | None = None,
) -> Engine:
    """An engine for `url`, with the waits on the database bounded by the `database.*`
    timeouts of config.py, passed in as plain values (None: the driver's default). Errors never
    quote statement parameters: they would put whole mails (and their personal data) into logs
    and into the ledger's `error` column."""
    parsed = make_url(url)
    pool = {} if pool_timeout_seconds is None else {"pool_timeout": pool_timeout_seconds}
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            url,
            echo=echo,
            pool_pre_ping=True,
            hide_parameters=True,
            connect_args=_postgres_connect_args(
                parsed, connect_timeout_seconds, statement_timeout_ms, lock_timeout_ms
            ),
            **pool,
        )
    in_memory = parsed.database in (None, "", ":memory:")
    connect_args: dict[str, Any] = {"timeout": busy_timeout_ms / 1000}
    if not in_memory:
        Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
        # Writers wait on a lock file rather than in SQLite's busy handler (writelock.py).
        database = str(parsed.database)
        if not database.startswith("file:"):
            connect_args["factory"] = connection_factory(database, busy_timeout_ms / 1000)
    engine = create_engine(
        url,
        echo=echo,
        hide_parameters=True,
        connect_args=connect_args,
        # An in-memory database has one connection per thread: no pool to wait for.
        **({} if in_memory else pool),
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


def _postgres_connect_args(
    parsed: URL,
    connect_timeout_seconds: int | None,
    statement_timeout_ms: int | None,
    lock_timeout_ms: int | None,
) -> dict[str, Any]:
    """libpq parameters bounding each wait: opening a connection, unacknowledged data on a
    blackholed network, a statement, a lock. The URL's own `options` (a search_path) are kept:
    `connect_args` would replace them."""
    args: dict[str, Any] = {}
    if connect_timeout_seconds is not None:
        args["connect_timeout"] = int(connect_timeout_seconds)
        args["tcp_user_timeout"] = int(connect_timeout_seconds) * 1000
    settings = {"statement_timeout": statement_timeout_ms, "lock_timeout": lock_timeout_ms}
    options = [f"-c {name}={int(value)}" for name, value in settings.items() if value is not None]
    if options:
        in_url = parsed.query.get("options", ())
        args["options"] = " ".join([*options, *((in_url,) if isinstance(in_url, str) else in_url)])
    return args


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
