"""Fault tests with real processes and real signals: web (uvicorn) and worker (Celery) as separate processes.

- SIGKILL the worker mid-job, start a new one: the job finishes from its last checkpoint, its step series is
  continuous, the adapter loads with plain peft.
- A worker vanishes: within the heartbeat timeout the job is requeued, and another worker finishes it.
- Restart Redis (a private redis-server) while a job runs: the job finishes, no metric point is lost.
- Restart the web server under a connected SSE client: it reconnects with Last-Event-ID and gets every point
  exactly once.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sse import read_events
from tests.studio import PROJECT_ROOT, free_port, sst2_slice, studio_env, wait_for_job

pytestmark = pytest.mark.e2e

STEPS = 24


@dataclass
class Cluster:
    """A web process and worker processes on one data folder, each startable and killable on its own."""

    tmp: Path
    overrides: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: f"pst_{secrets.token_urlsafe(24)}")
    web: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = self.tmp / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env = studio_env(
            self.data_dir,
            PEFT_STUDIO_ADMIN_TOKEN=self.token,
            PEFT_STUDIO_TORCH_THREADS="1",
            PEFT_STUDIO_HEARTBEAT_SECONDS="1",
            PEFT_STUDIO_REAPER_INTERVAL_SECONDS="1",
            **self.overrides,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        return subprocess.Popen(
            args, cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_web(self) -> None:
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.web = self._spawn("web", args)
        deadline = time.monotonic() + 90
        while True:
            assert self.web.poll() is None, self.logs()
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"web did not start\n{self.logs()}"
            time.sleep(0.2)

    def start_worker(self, hostname: str) -> subprocess.Popen[bytes]:
        process = self._spawn(hostname, [sys.executable, "-m", "app.cli", "worker", "--hostname", hostname])
        self.workers[hostname] = process
        return process

    def kill(self, process: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        if process is None or process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def stop(self) -> None:
        for process in [*self.workers.values(), self.web]:
            self.kill(process, signal.SIGTERM)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {self.token}"})

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.glob("*.log"))
        )


@contextmanager
def cluster(tmp_path: Path, **overrides: str) -> Iterator[Cluster]:
    running = Cluster(tmp_path, overrides)
    try:
        running.start_web()
        yield running
    finally:
        running.stop()


def _launch(api: httpx.Client, tmp_path: Path, steps: int = STEPS, save_steps: int = 4) -> int:
    csv_path = sst2_slice(tmp_path / "sst2_160.csv", 160)
    upload = api.post("/api/v1/datasets", files={"file": (csv_path.name, csv_path.read_bytes(), "text/csv")})
    assert upload.status_code == 201, upload.text
    spec = {
        "dataset_id": upload.json()["id"],
        "method": "lora",
        "method_config": {"r": 4},
        "validation_fraction": 0.1,
        "training": {
            "max_steps": steps,
            "batch_size": 8,
            "learning_rate": 0.002,
            "logging_steps": 1,
            "eval_steps": 1000,
            "max_length": 32,
            "save_steps": save_steps,
        },
    }
    created = api.post("/api/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


def _wait(predicate: Any, timeout: float, what: str, logs: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.2)


def _past_a_checkpoint(api: httpx.Client, job_id: int) -> int | None:
    """The newest checkpoint's step once the job has trained at least 2 steps beyond it."""
    checkpoints = api.get(f"/api/v1/jobs/{job_id}/checkpoints").json()
    if not checkpoints:
        return None
    step = int(checkpoints[-1]["step"])
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    return step if job["current_step"] >= step + 2 and job["status"] == "running" else None


def _train_steps(api: httpx.Client, job_id: int) -> list[int]:
    return [p["step"] for p in api.get(f"/api/v1/jobs/{job_id}/metrics").json() if p["split"] == "train"]


def _events(api: httpx.Client, job_id: int) -> list[str]:
    return [e["message"] for e in api.get(f"/api/v1/jobs/{job_id}/events").json()]


def test_sigkill_worker_then_new_worker_finishes_from_checkpoint(tmp_path: Path) -> None:
    with cluster(tmp_path) as studio, studio.client() as api:
        # given a worker training a LoRA job that has passed a checkpoint
        worker = studio.start_worker("trainer@faults")
        job_id = _launch(api, tmp_path)
        checkpoint = _wait(lambda: _past_a_checkpoint(api, job_id), 240, "a checkpoint", studio.logs)

        # when the worker is killed with SIGKILL and a new one (same name) starts
        studio.kill(worker, signal.SIGKILL)
        assert api.get(f"/api/v1/jobs/{job_id}").json()["status"] == "running"
        studio.start_worker("trainer@faults")

        # then the job finishes, resumed from its checkpoint, with every step exactly once
        job = wait_for_job(api, job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], studio.logs())
        assert _train_steps(api, job_id) == list(range(1, STEPS + 1))
        events = _events(api, job_id)
        assert any("restarted while running" in m for m in events), events
        assert any(m.startswith("resuming from the checkpoint at step") for m in events), events
        resumed_at = int(next(m for m in events if m.startswith("resuming")).split("step ")[1].split(";")[0])
        assert resumed_at >= checkpoint

        # and the adapter loads with plain peft
        from tests.test_e2e import _plain_peft_probabilities

        download = api.get(f"/api/v1/adapters/{job['adapter_id']}/download")
        assert download.status_code == 200
        probabilities = _plain_peft_probabilities(download.content, tmp_path / "adapter")
        assert all(abs(sum(row) - 1) < 1e-5 for row in probabilities)


def test_vanished_worker_is_requeued_within_heartbeat_timeout(tmp_path: Path) -> None:
    timeout = 4
    with (
        cluster(
            tmp_path, PEFT_STUDIO_HEARTBEAT_TIMEOUT_SECONDS=str(timeout), PEFT_STUDIO_MAX_ATTEMPTS="2"
        ) as studio,
        studio.client() as api,
    ):
        # given a job whose worker vanishes without a trace (and no worker of that name comes back)
        worker = studio.start_worker("lost@faults")
        job_id = _launch(api, tmp_path)
        _wait(lambda: _past_a_checkpoint(api, job_id), 240, "a checkpoint", studio.logs)
        studio.kill(worker, signal.SIGKILL)

        # then the web app's reaper requeues it within the heartbeat timeout (plus a reaper pass)
        requeued = _wait(
            lambda: api.get(f"/api/v1/jobs/{job_id}").json()["status"] == "queued",
            timeout + 15,
            "requeue",
            studio.logs,
        )
        assert requeued
        assert any("stopped responding" in m for m in _events(api, job_id))

        # and another worker finishes it from the checkpoint
        studio.start_worker("other@faults")
        job = wait_for_job(api, job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], studio.logs())
        assert job["attempt"] == 2
        assert _train_steps(api, job_id) == list(range(1, STEPS + 1))


@contextmanager
def private_redis(port: int, workdir: Path) -> Iterator[Any]:
    """A redis-server of the test's own (no persistence), which the test may stop and start again."""
    binary = shutil.which("redis-server")
    if binary is None:
        from tests.conftest import require_service

        require_service("redis-server", False)
    assert binary is not None
    workdir.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=workdir,
            stdout=(workdir / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        deadline = time.monotonic() + 20
        import redis

        while True:
            with suppress(Exception):
                if redis.Redis(port=port, socket_timeout=1).ping():
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def stop() -> None:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)

    start()
    try:
        yield type("Redis", (), {"start": staticmethod(start), "stop": staticmethod(stop)})
    finally:
        stop()


def test_restart_redis_while_job_runs(tmp_path: Path) -> None:
    port = free_port()
    with (
        private_redis(port, tmp_path / "redis") as redis_server,
        cluster(tmp_path, PEFT_STUDIO_BROKER_URL=f"redis://127.0.0.1:{port}/0") as studio,
        studio.client() as api,
    ):
        # given a job running with Redis as the broker
        studio.start_worker("redis@faults")
        job_id = _launch(api, tmp_path, steps=STEPS)
        _wait(
            lambda: api.get(f"/api/v1/jobs/{job_id}").json()["current_step"] >= 3,
            240,
            "training",
            studio.logs,
        )

        # when Redis restarts (losing everything it held)
        redis_server.stop()
        time.sleep(2)
        redis_server.start()

        # then the job finishes and no metric point is lost
        job = wait_for_job(api, job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], studio.logs())
        assert _train_steps(api, job_id) == list(range(1, STEPS + 1))


def _stream_with_reconnects(studio: Cluster, job_id: int, on_point: Any) -> tuple[list[dict[str, Any]], int]:
    """Read the job's SSE stream like a browser: reconnect with Last-Event-ID whenever it breaks."""
    points: list[dict[str, Any]] = []
    last_id: str | None = None
    reconnects = 0
    deadline = time.monotonic() + 300
    headers = {"Authorization": f"Bearer {studio.token}"}
    while time.monotonic() < deadline:
        if last_id:
            headers["Last-Event-ID"] = last_id
        try:
            with httpx.stream(
                "GET", f"{studio.url}/api/v1/jobs/{job_id}/stream", headers=headers, timeout=60
            ) as response:
                assert response.status_code == 200
                for event in read_events(response):
                    if event.event == "metric":
                        points.append(json.loads(event.data))
                        last_id = event.id
                        on_point(len(points))
                    elif event.event == "end":
                        return points, reconnects
        except httpx.HTTPError:
            pass
        reconnects += 1
        time.sleep(0.5)
    raise AssertionError(f"stream did not end\n{studio.logs()}")


def test_restart_web_server_under_sse_client(tmp_path: Path) -> None:
    with cluster(tmp_path) as studio, studio.client() as api:
        studio.start_worker("sse@faults")
        job_id = _launch(api, tmp_path, steps=STEPS, save_steps=0)
        restarted: list[bool] = []

        def restart_once(count: int) -> None:
            # after a few points, the web server goes down and comes back on the same port
            if count == 3 and not restarted:
                restarted.append(True)
                studio.kill(studio.web, signal.SIGKILL)
                time.sleep(1)
                studio.start_web()

        points, reconnects = _stream_with_reconnects(studio, job_id, restart_once)
        assert restarted and reconnects >= 1
        history = api.get(f"/api/v1/jobs/{job_id}/metrics").json()
        ids = [p["id"] for p in points]
        assert len(ids) == len(set(ids)), "a point arrived twice"
        assert ids == [p["id"] for p in history], "a point is missing"
        assert [p["step"] for p in points if p["split"] == "train"] == list(range(1, STEPS + 1))


def test_cancel_running_job_then_worker_takes_the_next(tmp_path: Path) -> None:
    with cluster(tmp_path) as studio, studio.client() as api:
        # given a long job running, a second one queued behind it and a third cancelled while queued
        studio.start_worker("cancel@faults")
        long_id = _launch(api, tmp_path, steps=5000, save_steps=0)
        spec = api.get(f"/api/v1/jobs/{long_id}").json()["spec"]
        spec["training"]["max_steps"] = 3
        next_id = api.post("/api/v1/jobs", json=spec).json()["id"]
        dropped_id = api.post("/api/v1/jobs", json=spec).json()["id"]
        assert api.post(f"/api/v1/jobs/{dropped_id}/cancel").json()["status"] == "cancelled"
        _wait(
            lambda: api.get(f"/api/v1/jobs/{long_id}").json()["current_step"] >= 2,
            240,
            "training",
            studio.logs,
        )

        # when the running job is cancelled
        assert api.post(f"/api/v1/jobs/{long_id}/cancel").status_code == 200

        # then it stops, the worker takes the next job, and never starts the one cancelled while queued
        cancelled = wait_for_job(api, long_id, timeout=60)
        assert cancelled["status"] == "cancelled" and cancelled["current_step"] < 5000
        finished = wait_for_job(api, next_id, timeout=240)
        assert finished["status"] == "succeeded", (finished["error"], studio.logs())
        dropped = api.get(f"/api/v1/jobs/{dropped_id}").json()
        assert dropped["status"] == "cancelled" and dropped["started_at"] is None and dropped["attempt"] == 0
