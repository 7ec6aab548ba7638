"""Shared fixtures. Tests run offline; Postgres, Redis and Chromium are real, and required when CI=true."""

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IN_CI = os.environ.get("CI", "").lower() == "true"
# The in-process studio's admin API token (PEFT_STUDIO_ADMIN_TOKEN): the `client` fixture sends it.
ADMIN_TOKEN = "pst_test-admin-token-not-secret-0000"
EXPECT_TIMEOUT_MS = 30_000  # browser checks on a busy machine (see chromium_path)
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# Tests run as root on a closed network: no sandbox, and no background calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, available: bool) -> None:
    """Skip when a service is missing on a developer machine; fail under CI=true."""
    if available:
        return
    message = f"{name} is not available on 127.0.0.1"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database for one test, dropped afterwards."""
    require_service("PostgreSQL", _port_open("127.0.0.1", 5432))
    import sqlalchemy

    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"studio_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database number of its own, flushed before and after the test."""
    require_service("Redis", _port_open("127.0.0.1", 6379))
    import redis

    number = 1 + (uuid.uuid4().int % 14)
    url = f"{REDIS_URL}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def chromium_path() -> str:
    """Debian's chromium binary, required under CI=true; also gives Playwright's ``expect`` a generous wait.

    ``page.set_default_timeout`` does not reach ``expect``, whose default is 5 s: on a loaded 2-core machine a
    state that follows background work (a download, a job, a stream) can take longer. Only a failing check
    waits the longer time; nothing is timed.
    """
    from playwright.sync_api import expect

    require_service("Chromium", shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists())
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    return CHROMIUM


@pytest.fixture(autouse=True, scope="session")
def registered_model_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests build tiny models in pytest's temporary folder: register it as a model folder
    (PEFT_STUDIO_MODEL_FOLDERS) for in-process and ``serve`` studios alike (tests/studio.py passes it on).
    Each studio's own data folder lies inside it too and stays refused (app/core/base_models.py)."""
    import json

    os.environ["PEFT_STUDIO_MODEL_FOLDERS"] = json.dumps([str(tmp_path_factory.getbasetemp())])
    yield
    os.environ.pop("PEFT_STUDIO_MODEL_FOLDERS", None)


_IN_PROCESS_URLS = ("PEFT_STUDIO_DATABASE_URL", "PEFT_STUDIO_BROKER_URL", "PEFT_STUDIO_ARTIFACT_ROOT")


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite studio database brought to the newest revision once per session (``alembic upgrade heads``
    takes a few tenths of a second); ``studio_settings`` starts each test from a copy of this file."""
    from app.core.db import get_engine, run_migrations
    from app.core.settings import get_settings

    data_dir = tmp_path_factory.mktemp("migrated") / "data"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_STUDIO_DATA_DIR", str(data_dir))
        for name in _IN_PROCESS_URLS:
            patch.delenv(name, raising=False)
        get_settings.cache_clear()
        get_engine.cache_clear()
        run_migrations()
        get_engine().dispose()  # checkpoints the WAL: the one file holds the whole database
        get_settings.cache_clear()
        get_engine.cache_clear()
    return data_dir / "studio.db"


@pytest.fixture
def studio_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_database: Path
) -> Iterator[Path]:
    """In-process settings pointed at a fresh data folder (SQLite, migrated); yields the folder."""
    from app.core.db import get_engine, run_migrations
    from app.core.queue import get_celery
    from app.core.settings import get_settings

    data_dir = tmp_path / "data"
    monkeypatch.setenv("PEFT_STUDIO_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PEFT_STUDIO_ADMIN_TOKEN", ADMIN_TOKEN)
    for name in _IN_PROCESS_URLS:
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    get_engine.cache_clear()
    get_celery.cache_clear()
    # A copy of the session's migrated database; run_migrations then finds it at the newest revision.
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_database, data_dir / "studio.db")
    run_migrations()
    yield data_dir
    get_engine().dispose()
    get_settings.cache_clear()
    get_engine.cache_clear()
    get_celery.cache_clear()


@pytest.fixture
def client(studio_settings: Path) -> Iterator["object"]:
    """A FastAPI TestClient on a fresh SQLite database (no worker: for validation and read paths), signed in
    as the admin with an API token (``Authorization: Bearer``; pass ``headers=`` to act as someone else)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as test_client:
        yield test_client


@dataclass
class Account:
    """A user made by a test: id, name, password and an API token."""

    id: int
    username: str
    password: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header of this user."""
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def make_user(client: object) -> Callable[..., Account]:
    """Make a non-admin user with a password and an API token: ``make_user("bob", max_concurrent_jobs=1)``."""
    from app.core.db import session_scope
    from app.services.accounts import create_api_token, create_user

    def make(username: str = "bob", **options: object) -> Account:
        password = f"{username}-password-123"
        with session_scope() as session:
            user = create_user(session, username, password, **options)  # type: ignore[arg-type]
            _, token = create_api_token(session, user, "tests")
            assert user.id is not None
            return Account(user.id, username, password, token)

    return make


@pytest.fixture
def other_user(make_user: Callable[..., Account]) -> Account:
    """A second, ordinary user ("bob") on the `client` studio."""
    return make_user("bob")
