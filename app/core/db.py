"""Database engine, sessions and migrations."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from app.core.settings import get_settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A file database gets a pool larger than the web's thread pool (40): with SQLAlchemy's default (5 + 10
        # overflow), 100 concurrent API clients left threads waiting for a connection while the requests holding
        # one waited for a thread to close their session, until the 30 s pool timeout (bench/perf_live.py).
        pool = {"pool_size": 64, "max_overflow": 64} if path and path != ":memory:" else {}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the web read while the worker writes; busy_timeout waits out short write locks.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # Postgres: a bounded pool per process (web, each worker, each DDP rank 0), checked before use so a
    # restarted database or a dropped idle connection costs a reconnect, not a failed request.
    settings = get_settings()
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_recycle=settings.database_pool_recycle_seconds,
    )


@lru_cache
def get_engine() -> Engine:
    """The process-wide engine for the configured database."""
    return _make_engine(get_settings().resolved_database_url)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for code outside requests (the worker, the CLI)."""
    with Session(get_engine()) as session:
        yield session


@contextmanager
def startup_lock() -> Iterator[None]:
    """Processes starting on one data folder migrate and bootstrap one at a time.

    ``uvicorn app.main:app --workers N`` (or gunicorn) starts N processes whose start-up each migrates the
    database: on a fresh SQLite database two of them would create the same tables at once, and the loser's
    failed start stops the whole server. An exclusive ``flock`` in the data folder puts them in turn (the later
    ones find the schema at head); the kernel releases it if a holder dies. Postgres' migrations also take an
    advisory lock (migrations/env.py), which covers starters on several hosts.
    """
    import fcntl

    folder = get_settings().resolved_data_dir
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "startup.lock").open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def run_migrations() -> None:
    """Bring the database schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", get_settings().resolved_database_url.replace("%", "%%"))
    # "heads": every branch of the revision graph (features add their own revisions off a shared base).
    command.upgrade(config, "heads")
