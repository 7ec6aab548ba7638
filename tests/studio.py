"""Start a real studio (``peft-studio serve``: uvicorn + a Celery worker) in subprocesses for end-to-end tests."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningStudio:
    """A studio started by a test: its base URL, data folder, environment, log file and admin API token."""

    url: str
    data_dir: Path
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes]
    token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header of the studio's admin (its bootstrap API token)."""
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, timeout: float = 180.0, token: str | None = None) -> httpx.Client:
        """An HTTP client pointed at the studio, authenticated with the admin token (or ``token``)."""
        headers = {"Authorization": f"Bearer {token if token is not None else self.token}"}
        return httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def login_url(self, next_path: str = "/") -> str:
        """A URL that signs a browser in as the admin (the one-time login link) and then shows ``next_path``."""
        return f"{self.url}/login/token?token={self.token}&next={next_path}"

    def open_page(self, page: Any, path: str = "/") -> None:
        """Sign a Playwright page in as the admin and open ``path``."""
        page.goto(self.login_url(path))

    def log(self) -> str:
        """What the studio's processes printed so far."""
        return self.log_path.read_text(errors="replace")


def studio_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment a test studio runs with: offline, its own data folder, small threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFT_STUDIO_")}
    if "PEFT_STUDIO_MODEL_FOLDERS" in os.environ:  # tests' tiny models (tests/conftest.py)
        env["PEFT_STUDIO_MODEL_FOLDERS"] = os.environ["PEFT_STUDIO_MODEL_FOLDERS"]
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PEFT_STUDIO_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


@contextmanager
def run_studio(data_dir: Path, workers: int = 1, **overrides: str) -> Iterator[RunningStudio]:
    """Run ``peft-studio serve`` until the block ends; waits until /healthz answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # The admin's API token is fixed up front so tests (and the browser login link) can use it.
    token = overrides.pop("PEFT_STUDIO_ADMIN_TOKEN", None) or f"pst_{secrets.token_urlsafe(24)}"
    env = studio_env(data_dir, PEFT_STUDIO_ADMIN_TOKEN=token, **overrides)
    log_path = data_dir / "studio.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(workers)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    studio = RunningStudio(f"http://127.0.0.1:{port}", data_dir, env, log_path, process, token)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"studio exited early:\n{studio.log()}")
            try:
                if httpx.get(f"{studio.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"studio did not answer within 60 s:\n{studio.log()}")
            time.sleep(0.2)
        yield studio
    finally:
        _cancel_unfinished_jobs(studio)
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _cancel_unfinished_jobs(studio: RunningStudio) -> None:
    """Cancel what a test left queued or running: the worker's warm shutdown then ends at once instead of
    training on until the 30 s stop timeout kills it. Best effort: a studio that does not answer is stopped."""
    if studio.process.poll() is not None:
        return
    try:
        with studio.client(timeout=10) as api:
            jobs = api.get("/api/v1/jobs", params={"limit": 1000}).json()["data"]
            for job in jobs:
                if job["status"] in ("queued", "running"):
                    api.post(f"/api/v1/jobs/{job['id']}/cancel")
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        pass


def wait_for_job(
    client: httpx.Client,
    job_id: int,
    timeout: float = 300,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, object]:
    """Poll a job until its status is one of ``until``."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return dict(job)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.1)


def sst2_slice(target: Path, rows: int, source: str = "train.csv") -> Path:
    """The first ``rows`` rows of the shared SST-2 file, written to ``target``."""
    lines = (SHARED_DATA / "sst2" / source).read_text(encoding="utf-8").splitlines()
    target.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return target
