"""The ``peft-studio`` command, run as a user runs it: a subprocess with its own environment."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def peft_studio(
    *args: str, data_dir: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the console script (or ``python -m app.cli`` where it is not installed) and capture its output."""
    script = Path(sys.executable).parent / "peft-studio"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFT_STUDIO_")}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1", TERM="dumb", COLUMNS="200")
    if data_dir is not None:
        env["PEFT_STUDIO_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [*command, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_serve_worker_and_migrate() -> None:
    result = peft_studio("--help")

    assert result.returncode == 0, result.stderr
    for command in ("serve", "worker", "migrate"):
        assert command in result.stdout, f"{command!r} missing from:\n{result.stdout}"


def test_serve_help_shows_its_options() -> None:
    result = peft_studio("serve", "--help")

    assert result.returncode == 0, result.stderr
    for option in ("--host", "--port", "--workers"):
        assert option in result.stdout


def test_migrate_creates_the_tables_in_a_fresh_data_dir(tmp_path: Path) -> None:
    # given a data folder that does not exist yet
    data_dir = tmp_path / "data"
    # when
    result = peft_studio("migrate", data_dir=data_dir)
    # then the SQLite database is there with every table, at the newest revision
    assert result.returncode == 0, result.stderr
    assert "database is up to date" in result.stdout
    database = data_dir / "studio.db"
    assert database.is_file()
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revisions = {row[0] for row in connection.execute("SELECT version_num FROM alembic_version")}
    assert {"dataset", "job", "jobevent", "metricpoint", "adapter", "alembic_version"} <= tables
    heads = set(ScriptDirectory(str(PROJECT_ROOT / "migrations")).get_heads())
    assert revisions == heads


def test_migrate_twice_is_harmless(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert peft_studio("migrate", data_dir=data_dir).returncode == 0

    again = peft_studio("migrate", data_dir=data_dir)

    assert again.returncode == 0, again.stderr
    assert "database is up to date" in again.stdout


def test_serve_runs_on_uvloop_and_httptools() -> None:
    # given uvicorn configured as `serve` configures it (loop and http left to "auto"), then it picks the C event
    # loop and HTTP protocol (issue 20: a polled request and each live-stream write cost less CPU with them)
    from uvicorn.config import Config

    config = Config("app.main:app", lifespan="off")
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    assert config.get_loop_factory().__module__ == "uvloop"
