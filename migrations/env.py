"""Alembic environment: migrates the database named by the studio's settings."""

from alembic import context
from sqlmodel import SQLModel

import app.core.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from app.core.db import get_engine

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    """Run migrations on the studio's engine; Postgres takes an advisory lock so two starters wait in turn."""
    engine = get_engine()
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_lock(727274)")
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # A batch rebuild drops a parent table and renames its copy back (0009: AUTOINCREMENT); with foreign
            # keys on, the drop fails. The pragma only works outside a transaction: set it first, check after.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migrations left rows whose foreign keys point nowhere: {broken[:5]}")
            if not sqlite:
                connection.commit()  # Postgres: the lock statement began the transaction, so Alembic left it open
        finally:
            if sqlite:
                connection.rollback()
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
            if connection.dialect.name == "postgresql":
                # Unlock only after the commit above (or the rollback of a failed migration): a starter that got
                # the lock while this schema was uncommitted read an empty alembic_version and created the same
                # tables again (DuplicateTable). The advisory lock belongs to the session and outlives commits.
                if connection.in_transaction():
                    connection.rollback()  # only a failed migration is left uncommitted here
                connection.exec_driver_sql("SELECT pg_advisory_unlock(727274)")
                connection.commit()


run_migrations_online()
