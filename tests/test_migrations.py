"""The Alembic revisions build exactly the schema the models describe, on SQLite and on Postgres."""

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlmodel import SQLModel

import app.core.models  # noqa: F401  (registers every table on SQLModel.metadata)
from app.core.db import PROJECT_ROOT, get_engine, run_migrations
from app.core.settings import get_settings


def _schema_differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def test_the_revision_graph_has_one_head() -> None:
    # features grow their own branches off 0001; a merge revision joins them before they land
    heads = ScriptDirectory(str(PROJECT_ROOT / "migrations")).get_heads()

    assert len(heads) == 1, f"several Alembic heads {heads}: add a merge revision"


def test_migrated_sqlite_matches_the_models(studio_settings: Path) -> None:
    # given a fresh SQLite database migrated by the fixture
    url = get_settings().resolved_database_url
    # when the migrated schema is compared with the models
    differences = _schema_differences(url)
    # then there is nothing a new revision would have to add
    assert differences == []


@pytest.mark.services
def test_migrated_postgres_matches_the_models(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # given a fresh Postgres database, migrated
    monkeypatch.setenv("PEFT_STUDIO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PEFT_STUDIO_DATABASE_URL", postgres_url)
    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        run_migrations()
        # when / then
        assert _schema_differences(postgres_url) == []
    finally:
        get_engine().dispose()
        get_settings.cache_clear()
        get_engine.cache_clear()
