"""Live job feeds: one database reader per watched job per web process, fanned out to every stream.

Before, each ``/stream`` connection polled the database on its own every ``stream_poll_seconds`` (and held its
own Redis subscription): ten idle viewers cost a third of a core. Now the first viewer of a job starts a
:class:`JobFeed` on the web process's event loop; it alone reads the job (new points after its cursor, and the
job's status) once per tick, woken by one Redis subscription when the broker is Redis or by its poll interval on
the embedded default, and wakes every subscriber. A waiting subscriber costs nothing but an ``asyncio.Event``
and the stream's heartbeat; the last one to leave stops the feed.

What a stream may be sent is unchanged: every point is encoded to JSON once, by the feed, and each subscriber
walks the feed's buffer from its own cursor (``Last-Event-ID``). The feed holds every existing point with an id
above ``base``; a subscriber that starts below it (a fresh page, a reconnect after a while) first catches up
from the database with its own reads, as the old per-connection stream did, then follows the buffer. A resume
deletes points the buffer may hold: the feed notices the new attempt, drops its buffer and moves ``base``
up, so a subscriber behind it reads the surviving points from the database again. Hand-written: the
broadcasting libraries for Starlette (``broadcaster``) fan out messages, not a replayable, id-ordered buffer.
"""

import asyncio
import bisect
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlmodel import Session, col, func, select

from app.core.db import get_engine
from app.core.events import Subscription
from app.core.models import Adapter, Job, JobStatus, MetricPoint, MetricPointPublic
from app.core.settings import get_settings

log = logging.getLogger(__name__)

READ_LIMIT = 1000  # points per database read (a feed behind reads again at once)
BUFFER_POINTS = 20_000  # points a feed keeps for subscribers to walk; older ones are read from the database
IDLE_RECHECK_SECONDS = 5.0  # a waiting subscriber looks at its connection this often


@dataclass(frozen=True)
class LivePoint:
    """A metric point as the stream sends it: id, attempt and step for the stream's bookkeeping, and its SSE frame."""

    id: int
    attempt: int
    step: int
    frame: bytes  # the whole ``event: metric`` SSE frame, encoded once for every viewer


def live_point(point: MetricPoint) -> LivePoint:
    """Encode one row for streaming."""
    public = MetricPointPublic.model_validate(point)
    data = public.model_dump_json()
    # What sse-starlette's ServerSentEvent(data, event="metric", id).encode() writes (compact JSON has no newline);
    # tests/test_live_stream.py checks they are the same bytes. The services layer does not import the web stack.
    frame = f"id: {public.id}\r\nevent: metric\r\ndata: {data}\r\n\r\n".encode()
    return LivePoint(int(public.id), public.attempt, public.step, frame)


def status_snapshot(session: Session, job: Job) -> str:
    """The ``event: status`` payload of a job (the adapter id is looked up only once the job succeeded)."""
    adapter_id = None
    if job.status == JobStatus.succeeded:
        adapter_id = session.exec(select(Adapter.id).where(Adapter.job_id == job.id)).first()
    return json.dumps(
        {
            "status": job.status,
            "progress": job.progress,
            "step": job.current_step,
            "total_steps": job.total_steps,
            "eta_seconds": job.eta_seconds,
            "error": job.error,
            "adapter_id": adapter_id,
        }
    )


def read_tick(job_id: int, after: int | None) -> tuple[list[LivePoint], str, bool, int]:
    """One tick's read, in one session: the points after ``after`` (or, on the first tick, only the newest id),
    the status snapshot, whether the job is finished, and the newest point id seen."""
    with Session(get_engine()) as session:
        if after is None:  # first tick: where the feed starts; subscribers read older points themselves
            newest = session.exec(select(func.max(MetricPoint.id)).where(MetricPoint.job_id == job_id)).one()
            points: list[LivePoint] = []
            cursor = int(newest or 0)
        else:
            rows = session.exec(
                select(MetricPoint)
                .where(MetricPoint.job_id == job_id, col(MetricPoint.id) > after)
                .order_by(col(MetricPoint.id))
                .limit(READ_LIMIT)
            ).all()
            points = [live_point(row) for row in rows]
            cursor = points[-1].id if points else after
        job = session.get(Job, job_id)
        if job is None:  # deleted while watched: end the streams
            return points, json.dumps({"status": "deleted"}), True, cursor
        return points, status_snapshot(session, job), job.status.is_terminal, cursor


def read_points(job_id: int, after: int, limit: int = READ_LIMIT) -> list[LivePoint]:
    """A subscriber's own catch-up read: the job's points after ``after``, in id order."""
    with Session(get_engine()) as session:
        rows = session.exec(
            select(MetricPoint)
            .where(MetricPoint.job_id == job_id, col(MetricPoint.id) > after)
            .order_by(col(MetricPoint.id))
            .limit(limit)
        ).all()
        return [live_point(row) for row in rows]


@dataclass
class JobFeed:
    """The shared reader of one job in this process, and what it has read."""

    job_id: int
    poll_seconds: float
    points: list[LivePoint] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    base: int | None = (
        None  # every existing point with an id above this is in ``points`` (None: not read yet)
    )
    cursor: int = 0  # the newest point id read
    status: str | None = None
    finished: bool = False  # a tick saw the job finished and no new points: nothing more will come
    reads: int = 0  # ticks that read the database (tests count them)
    subscribers: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: "asyncio.Task[None] | None" = None

    def after(self, cursor: int) -> list[LivePoint]:
        """Buffered points after ``cursor`` (the caller checked that ``cursor >= base``)."""
        return self.points[bisect.bisect_right(self.ids, cursor) :]

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def _take(self, points: list[LivePoint]) -> None:
        if not points:
            return
        last_attempt = self.points[-1].attempt if self.points else None
        if last_attempt is not None and any(point.attempt != last_attempt for point in points):
            # A new attempt: the resume before it may have deleted buffered points. Keep only this read (it
            # is one snapshot of what exists); subscribers below ``base`` re-read the survivors themselves.
            self.points, self.ids, self.base = [], [], self.cursor
        self.points.extend(points)
        self.ids.extend(point.id for point in points)
        if len(self.points) > BUFFER_POINTS:
            drop = len(self.points) - BUFFER_POINTS
            self.base = self.ids[drop - 1]
            del self.points[:drop], self.ids[:drop]

    async def run(self) -> None:
        """Read the job once per tick until it is finished (or the last subscriber leaves)."""
        async with Subscription(self.job_id) as news:
            while True:
                try:
                    points, status, terminal, cursor = await asyncio.to_thread(
                        read_tick, self.job_id, None if self.base is None else self.cursor
                    )
                except Exception:  # noqa: BLE001 - a failed read (database busy) is retried next tick
                    log.exception("live feed of job %s: read failed", self.job_id)
                    await asyncio.sleep(max(self.poll_seconds, 0.5))
                    continue
                self.reads += 1
                first = self.base is None
                if first:
                    self.base = cursor
                self._take(points)
                self.cursor = cursor
                changed = first or bool(points) or status != self.status
                self.status = status
                if terminal and not points and not first:
                    self.finished = True
                    changed = True
                if changed:
                    self._notify()
                if self.finished:
                    return
                if len(points) < READ_LIMIT and not first:
                    # Redis: woken as soon as the worker publishes; the timeout keeps polling as a fallback.
                    await news.wait(self.poll_seconds)


@dataclass
class FeedHub:
    """The feeds of one event loop (one web process), by database and job."""

    feeds: dict[tuple[str, int], JobFeed] = field(default_factory=dict)

    @asynccontextmanager
    async def subscribe(self, job_id: int) -> AsyncIterator[JobFeed]:
        """Join the job's feed (starting it when nobody watches the job yet) for the life of a stream."""
        key = (str(get_engine().url), job_id)
        feed = self.feeds.get(key)
        if feed is None or feed.finished or (feed.task is not None and feed.task.done()):
            # A finished feed ends its own viewers; a new viewer (the job may have been resumed) gets a new one.
            feed = JobFeed(job_id, get_settings().stream_poll_seconds)
            self.feeds[key] = feed
        if feed.task is None:
            feed.task = asyncio.get_running_loop().create_task(feed.run(), name=f"live-feed-{job_id}")
        feed.subscribers += 1
        try:
            yield feed
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0:
                if self.feeds.get(key) is feed:
                    del self.feeds[key]
                if feed.task is not None and not feed.task.done():
                    feed.task.cancel()


_hubs: dict[int, FeedHub] = {}


def get_hub() -> FeedHub:
    """The feeds of the running event loop (each web process has one loop; tests may start several)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(id(loop))
    if hub is None:
        for stale in [key for key, value in _hubs.items() if not value.feeds]:
            del _hubs[stale]
        hub = _hubs[id(loop)] = FeedHub()
    return hub


async def wait_for_change(changed: asyncio.Event, timeout: float = IDLE_RECHECK_SECONDS) -> bool:
    """Wait until a feed's ``changed`` event fires (True) or ``timeout`` passes (False)."""
    try:
        await asyncio.wait_for(changed.wait(), timeout)
    except TimeoutError:
        return False
    return True
