"""Alembic environment: migrates the database named by the studio's settings."""

from alembic import context
from sqlmodel import SQLModel

import app.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from app.db import get_engine

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    """Run migrations on the studio's engine; Postgres takes an advisory lock so two starters wait in turn."""
    engine = get_engine()
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_lock(727274)")
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SELECT pg_advisory_unlock(727274)")
                connection.commit()


run_migrations_online()
