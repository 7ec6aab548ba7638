"""The live stream at team scale: one database reader per job per web process, fanned out to every viewer
(app/services/live.py).

- 50 viewers of one job each get every point once and in order, across a restart of the web process (they
  reconnect with Last-Event-ID, as browsers do).
- The database is read once per tick per job, however many viewers there are (statements counted).
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session

from tests.conftest import ADMIN_TOKEN
from tests.studio import PROJECT_ROOT, free_port, studio_env

VIEWERS = 50
CSV = b"text,label\ngood movie,pos\nbad movie,neg\nlovely film,pos\nawful film,neg\ngreat,pos\npoor,neg\n"


def _running_job() -> int:
    from app.core.db import get_engine
    from app.core.models import JobStatus
    from tests.factories import create_dataset, create_job

    with Session(get_engine()) as session:
        dataset = create_dataset(session, CSV)
        job = create_job(session, dataset_id=dataset.id, training={"max_steps": 100})
        job.status, job.attempt, job.run_token, job.total_steps = JobStatus.running, 1, "token-1", 100
        session.add(job)
        session.commit()
        assert job.id is not None
        return job.id


def _write(job_id: int, steps: range) -> None:
    """Points through the worker's own writer (batched, fenced by the run token)."""
    from app.core.models import utcnow
    from worker.reporting import MetricWriter

    writer = MetricWriter(job_id, cancel_poll=0.05, run_token="token-1", attempt=1)
    for step in steps:
        point = {"step": step, "split": "train", "values": {"loss": 1.0 / step}, "created_at": utcnow()}
        writer.put({"point": point})
    writer.close()


def _finish(job_id: int) -> None:
    from app.core.db import get_engine
    from app.core.models import Job, JobStatus

    with Session(get_engine()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = JobStatus.succeeded
        session.add(job)
        session.commit()


def _history(job_id: int) -> list[int]:
    from sqlmodel import col, select

    from app.core.db import get_engine
    from app.core.models import MetricPoint

    with Session(get_engine()) as session:
        ids = session.exec(
            select(MetricPoint.id).where(MetricPoint.job_id == job_id).order_by(col(MetricPoint.id))
        ).all()
    return [int(i or 0) for i in ids]


class Viewers:
    """``count`` SSE viewers of one job on their own event loop thread; each reconnects with Last-Event-ID
    whenever its stream breaks, until the stream ends."""

    def __init__(self, url: str, job_id: int, count: int) -> None:
        self.url, self.job_id = url, job_id
        self.received: list[list[int]] = [[] for _ in range(count)]
        self.connected = [0] * count
        self.ended = [False] * count
        self.errors: list[str] = []
        self._thread = threading.Thread(target=lambda: asyncio.run(self._all()), daemon=True)

    def __enter__(self) -> "Viewers":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=120)

    async def _all(self) -> None:
        limits = httpx.Limits(max_connections=len(self.received) + 5)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5), limits=limits) as http:
            await asyncio.gather(*(self._one(http, index) for index in range(len(self.received))))

    async def _one(self, http: httpx.AsyncClient, index: int) -> None:
        from tests.sse import Event

        deadline = time.monotonic() + 110
        while time.monotonic() < deadline:
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            if self.received[index]:
                headers["Last-Event-ID"] = str(self.received[index][-1])
            try:
                async with http.stream(
                    "GET", f"{self.url}/api/v1/jobs/{self.job_id}/stream", headers=headers
                ) as response:
                    if response.status_code != 200:
                        raise httpx.HTTPError(f"status {response.status_code}")
                    self.connected[index] += 1
                    event, data, event_id = "message", [], None
                    async for line in response.aiter_lines():
                        if line == "":
                            if data:
                                got = Event(event, "\n".join(data), event_id)
                                if got.event == "metric":
                                    self.received[index].append(int(json.loads(got.data)["id"]))
                                elif got.event == "end":
                                    self.ended[index] = True
                                    return
                            event, data, event_id = "message", [], None
                        elif line.startswith(":"):
                            continue
                        else:
                            field, _, value = line.partition(":")
                            value = value.removeprefix(" ")
                            if field == "event":
                                event = value
                            elif field == "data":
                                data.append(value)
                            elif field == "id":
                                event_id = value
            except (httpx.HTTPError, OSError) as error:
                self.errors.append(f"{index}: {type(error).__name__}")
            await asyncio.sleep(0.3)


def _wait(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def web_process(studio_settings: Path) -> Iterator[Any]:
    """A real uvicorn web process on the test's data folder, which the test may kill and start again."""
    port = free_port()
    env = studio_env(studio_settings, PEFT_STUDIO_ADMIN_TOKEN=ADMIN_TOKEN)
    log_path = studio_settings / "web.log"
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "app.main:app",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.poll() is None, log_path.read_text()
            with suppress(httpx.HTTPError):
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            return False

        _wait(up, 60, "the web process")

    def kill() -> None:
        process = processes[-1]
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    start()
    yield type("Web", (), {"url": f"http://127.0.0.1:{port}", "start": staticmethod(start), "kill": kill})
    for process in processes:
        if process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def test_fifty_viewers_get_every_point_once_in_order_across_a_web_restart(web_process: Any) -> None:
    # given: a running job that has logged 20 points, and 50 viewers watching it from the start
    job_id = _running_job()
    _write(job_id, range(1, 21))
    with Viewers(web_process.url, job_id, VIEWERS) as viewers:
        _wait(lambda: all(len(r) >= 20 for r in viewers.received), 60, "the first points at every viewer")
        _write(job_id, range(21, 41))  # while they watch
        _wait(lambda: all(len(r) >= 25 for r in viewers.received), 60, "live points at every viewer")
        # when: the web process dies (kill -9) while points keep coming, and starts again on the same port
        web_process.kill()
        _write(job_id, range(41, 61))
        web_process.start()
        _write(job_id, range(61, 81))
        _finish(job_id)
    # then: every viewer reconnected and got every point exactly once, in order, and the end
    history = _history(job_id)
    assert len(history) == 80
    assert all(viewers.ended), viewers.errors[:5]
    assert all(count >= 2 for count in viewers.connected), viewers.connected
    for received in viewers.received:
        assert received == history


def test_the_database_is_read_once_per_tick_however_many_watch(
    studio_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from sqlalchemy import event

    from app.core.db import get_engine
    from app.core.settings import get_settings
    from app.main import create_app
    from app.services import live

    # nothing else in this process reads the database on its own (the reaper, the webhook dispatcher)
    monkeypatch.setenv("PEFT_STUDIO_REAPER_INTERVAL_SECONDS", "0")
    monkeypatch.setenv("PEFT_STUDIO_WEBHOOK_POLL_SECONDS", "0")
    get_settings.cache_clear()

    # given: a web app in this process (so its statements can be counted) and a running job
    job_id = _running_job()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: server.started, 30, "the web app")
    statements: list[str] = []
    counting = threading.Event()

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if counting.is_set():
            statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        with Viewers(f"http://127.0.0.1:{port}", job_id, VIEWERS) as viewers:
            _write(job_id, range(1, 3))
            _wait(
                lambda: all(len(r) == 2 for r in viewers.received), 60, "every viewer connected and caught up"
            )
            feeds = [feed for hub in live._hubs.values() for feed in hub.feeds.values()]
            assert len(feeds) == 1 and feeds[0].subscribers == VIEWERS  # one reader for 50 viewers
            # an open stream holds no pooled connection (Postgres' pool is 5 + 45, not one per viewer)
            assert get_engine().pool.checkedout() <= 2, get_engine().pool.status()
            feed = feeds[0]
            # when: points arrive over ~2 s while the 50 viewers watch
            ticks_before = feed.reads
            counting.set()
            for start in range(3, 43, 8):
                _write(job_id, range(start, start + 8))
                time.sleep(0.4)
            _wait(lambda: all(len(r) == 42 for r in viewers.received), 60, "every point at every viewer")
            counting.clear()
            ticks = feed.reads - ticks_before
            _finish(job_id)
        # then: the points were read once per tick of the one feed, not once per viewer per tick
        selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        point_reads = [s for s in selects if "FROM metricpoint" in s]
        job_reads = [
            s for s in selects if s.lstrip().startswith("SELECT job.id")
        ]  # the writer reads one column
        assert ticks >= 5
        assert ticks <= len(point_reads) <= ticks + 1, (len(point_reads), ticks)
        assert ticks <= len(job_reads) <= ticks + 1, (len(job_reads), ticks)
        assert all(ended for ended in viewers.ended)
        assert all(received == _history(job_id) for received in viewers.received)
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)
        server.should_exit = True
        thread.join(timeout=30)


def test_a_points_frame_is_what_sse_starlette_would_write() -> None:
    """The feed encodes each point's SSE frame once for every viewer, without the web stack's classes."""
    from sse_starlette import ServerSentEvent

    from app.core.models import MetricPoint, MetricPointPublic
    from app.services.live import live_point

    row = MetricPoint(id=7, job_id=1, step=3, split="eval", values={"loss": 0.5, "acc": 1.0})
    data = MetricPointPublic.model_validate(row).model_dump_json()
    assert live_point(row).frame == ServerSentEvent(data=data, event="metric", id="7").encode()
