"""``peft-studio serve --web-workers N``: N web processes answer on one port, and the job reaper and the webhook
dispatcher run in exactly one of them (app/services/background.py); when that one dies, another takes over."""

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

from tests.studio import PROJECT_ROOT, free_port, studio_env

pytestmark = pytest.mark.e2e

LEADER = re.compile(
    r"background duties \(job reaper, webhook dispatcher\) run in this web process, pid (\d+)"
)
FOLLOWER = "background duties run in another web process"


def _wait(condition: object, seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log.read_text(errors='replace')}"
        time.sleep(0.2)


def _answers_after_idle(port: int, idle: float) -> bool:
    """Two requests on one kept-alive connection, ``idle`` seconds apart: True when both are answered."""
    import socket

    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def response(conn: socket.socket) -> bytes:
        """One whole response (headers, then the Content-Length body), b"" when the server closed."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return b""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = conn.recv(4096)
            if not chunk:
                return b""
            body += chunk
        return head

    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        answers = []
        for pause in (0.0, idle):
            time.sleep(pause)
            try:
                conn.sendall(request)
                answers.append(response(conn).startswith(b"HTTP/1.1 200"))
            except OSError:
                answers.append(False)
        return all(answers)


def test_web_workers_run_the_background_duties_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    token = "pst_web-workers-test-token-0000000"
    env = studio_env(data_dir, PEFT_STUDIO_ADMIN_TOKEN=token)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--port",
                str(port),
                "--workers",
                "0",
                "--web-workers",
                "3",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert serve.poll() is None, log.read_text(errors="replace")
            with suppress(httpx.HTTPError):
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            return False

        _wait(up, 90, "serve", log)
        _wait(lambda: log.read_text().count(FOLLOWER) == 2, 60, "three web processes", log)
        # then: one of the three runs the duties, the lock file names it, and the API answers from all of them
        leaders = LEADER.findall(log.read_text())
        assert len(leaders) == 1, log.read_text()
        leader = int(leaders[0])
        assert (data_dir / "web-background.lock").read_text().strip() == str(leader)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
            assert all(api.get("/api/v1/jobs").status_code == 200 for _ in range(10))
        # and a connection left idle longer than uvicorn's default keep-alive (5 s, as long as httpx keeps one:
        # a client's next request could meet the close) is still open for the next request
        assert _answers_after_idle(port, idle=6.0)
        # when: that process dies
        os.kill(leader, signal.SIGKILL)
        # then: another web process takes the duties over (the kernel released the lock)
        _wait(lambda: len(LEADER.findall(log.read_text())) == 2, 30, "a new leader", log)
        assert int(LEADER.findall(log.read_text())[1]) != leader
    finally:
        with suppress(ProcessLookupError):
            os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)


def test_uvicorn_workers_start_together_on_a_fresh_database(tmp_path: Path) -> None:
    """``uvicorn app.main:app --workers 3`` with no ``peft-studio migrate`` first: every process migrates at start,
    and without the start-up lock two created the same tables at once and the loser stopped the server."""
    data_dir = tmp_path / "data"
    port = free_port()
    token = "pst_web-workers-test-token-0000000"
    env = studio_env(data_dir, PEFT_STUDIO_ADMIN_TOKEN=token)
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as out:
        web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--workers", "3"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert web.poll() is None, log.read_text(errors="replace")
            with suppress(httpx.HTTPError):
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            return False

        _wait(up, 90, "uvicorn", log)
        _wait(lambda: log.read_text().count("Application startup complete") == 3, 60, "three processes", log)
        # then all three started (one admin, the schema at head) and the API answers from them
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
            assert all(api.get("/api/v1/jobs").status_code == 200 for _ in range(10))
        assert "failed to start" not in log.read_text()
    finally:
        with suppress(ProcessLookupError):
            os.killpg(web.pid, signal.SIGTERM)
        try:
            web.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(web.pid, signal.SIGKILL)
