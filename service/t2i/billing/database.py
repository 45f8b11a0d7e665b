"""Open the billing database (SQLite embedded default, or PostgreSQL) and migrate it.

One code path for both: SQLAlchemy Core for queries, Alembic for the schema. SQLite runs in
WAL mode with synchronous=FULL (a commit survives a crash), and write transactions start with
BEGIN IMMEDIATE so that concurrent writers queue instead of failing on lock upgrades. The
SQLite file and its WAL/SHM companions are readable by their owner only (they hold key hashes
and everyone's balance).

PostgreSQL connections have a connect timeout and a statement timeout, so a database that
accepts connections but never answers cannot hang a request or the start-up; start-up waits
for an unreachable database for `startup_timeout` seconds, saying what it waits for, then fails.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, exc, text

from ..errors import Unavailable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Any constant: serialises `alembic upgrade` across replicas starting at the same time.
PG_MIGRATION_LOCK = 0x7432692D6D6967  # "t2i-mig"
CONNECT_TIMEOUT = 5  # seconds to open a connection
STATEMENT_TIMEOUT_MS = 10_000  # no ledger statement takes this long unless the database is stuck
POOL_TIMEOUT = 10  # seconds to wait for a pooled connection
STARTUP_TIMEOUT = 120.0  # seconds start-up waits for an unreachable database


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'billing.sqlite3'}"


def redact(url: str) -> str:
    """A database URL without its password, fit for logs and error messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_database(url: str, *, migrate: bool = True, startup_timeout: float = STARTUP_TIMEOUT) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        # Every use is an explicit transaction (engine.begin()), so pooled connections come back
        # clean and need no rollback on return.
        engine = create_engine(
            url, pool_size=8, max_overflow=8, pool_reset_on_return=None, pool_timeout=POOL_TIMEOUT,
            connect_args={"timeout": 30, "check_same_thread": False},
        )
        _configure_sqlite(engine)
        path = engine.url.database
        if path and path != ":memory:":
            _private_file(Path(path))
    else:
        engine = create_engine(
            url, pool_size=10, max_overflow=10, pool_pre_ping=True, pool_reset_on_return=None, pool_timeout=POOL_TIMEOUT,
            connect_args={"connect_timeout": CONNECT_TIMEOUT, "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"},
        )
    if migrate:
        _wait_until_reachable(engine, startup_timeout)
        upgrade(engine)
    return engine


def _private_file(path: Path) -> None:
    """Create the SQLite file owner-only before SQLite does (it copies the main file's mode to
    the -wal and -shm files it creates), and tighten an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if companion.exists():
            companion.chmod(0o600)


def _wait_until_reachable(engine: Engine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    where = redact(engine.url.render_as_string(hide_password=False))
    attempt = 0
    while True:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return
        except exc.DBAPIError as error:
            attempt += 1
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the billing database {where} was not reachable within {timeout:g} s: {error.orig}") from None
            log.warning("waiting for the billing database", extra={"database": where, "attempt": attempt, "error": str(error.orig)[:200]})
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def unavailable_error(error: BaseException, where: str) -> Unavailable | None:
    """Unavailable, naming the ledger, when `error` means the database cannot be reached (or
    did not answer in time); None for any other error."""
    if isinstance(error, exc.TimeoutError):  # the pool had no connection to give
        reason = "no database connection became free in time"
    elif isinstance(error, exc.DBAPIError) and (error.connection_invalidated or isinstance(error, exc.OperationalError)):
        reason = "the database did not answer"
    else:
        return None
    return Unavailable(f"the ledger ({where}) cannot be reached ({reason}), so nothing was charged; try again shortly")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's "begin" event below decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # Writers take the write lock up front, so they queue instead of failing when two
        # upgrade a read lock at once; readers (read_only=True) never block writers in WAL mode.
        read_only = connection.get_execution_options().get("read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent; safe with several replicas)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
