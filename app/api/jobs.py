"""/api/v1/jobs, including the live Server-Sent Events stream."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Header, Request, status
from fastapi.responses import FileResponse, Response
from pydantic import TypeAdapter
from sqlmodel import Session, col, func, select
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from app.core.db import get_engine
from app.core.models import (
    CheckpointPublic,
    JobEventPublic,
    JobPublic,
    JobsPublic,
    MetricPoint,
    MetricPointPublic,
)
from app.core.spec import JobSpec
from app.http import etag
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import audit, checkpoints, live
from app.services import jobs as service
from app.services.datasets import get_dataset

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def create_job(session: SessionDep, user: CurrentUser, spec: JobSpec) -> JobPublic:
    """Validate a job spec and queue it for a worker."""
    job = service.create_job(session, spec, user.id)
    audit.record(session, user, "create", "job", job.id)
    return service.job_public(session, job)


@router.post("/estimate")
async def estimate_job(session: SessionDep, owner_id: OwnerScope, spec: JobSpec) -> dict[str, Any]:
    """Before launch: the exact trainable and total parameter counts of the spec's base model with its method
    (built on the meta device; no weights are loaded), an estimate of training memory, in bytes by kind, and
    whether it fits each GPU class (``gpu_fit``)."""
    service.validate_spec(session, spec, owner_id)
    profile = get_dataset(session, spec.dataset_id, owner_id).profile
    from worker.estimate import estimate_job as estimate  # torch loads on first use, never at web start-up
    from worker.estimate import gpu_fit

    result = await asyncio.to_thread(estimate, spec, profile)
    # Scale out: the smallest GPU class that fits the estimate (a hint for spec.resources.gpu_class), and the
    # fit on every class the studio knows, in words too.
    from app.core.queue import suggest_gpu_class

    total = result.memory.total_bytes
    return {**result.model_dump(), "suggested_gpu_class": suggest_gpu_class(total), "gpu_fit": gpu_fit(total)}


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep, owner_id: OwnerScope, request: Request, offset: int = 0, limit: int = 100
) -> Response:
    """Jobs, newest first (yours; the admin sees everyone's). Answers 304 to a matching `If-None-Match`."""
    rows, count = service.list_jobs(session, max(offset, 0), min(max(limit, 1), 1000), owner_id)
    page = JobsPublic(data=service.jobs_public(session, rows), count=count)
    return etag.hashed_json(request, page.model_dump_json().encode())


@router.get("/{job_id}", response_model=JobPublic)
def get_job(session: SessionDep, owner_id: OwnerScope, request: Request, job_id: int) -> Response:
    """One job: status, progress, error. Answers 304 to a matching `If-None-Match`."""
    job = service.job_public(session, service.get_job(session, job_id, owner_id))
    return etag.hashed_json(request, job.model_dump_json().encode())


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(session: SessionDep, user: CurrentUser, owner_id: OwnerScope, job_id: int) -> JobPublic:
    """Cancel a queued job at once, or stop a running one within a few seconds."""
    job = service.cancel_job(session, job_id, owner_id)
    audit.record(session, user, "cancel", "job", job_id)
    return service.job_public(session, job)


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(session: SessionDep, user: CurrentUser, owner_id: OwnerScope, job_id: int) -> JobPublic:
    """Queue a failed or cancelled job again; it continues from its last checkpoint."""
    job = service.resume_job(session, job_id, owner_id)
    audit.record(session, user, "resume", "job", job_id)
    return service.job_public(session, job)


@router.post("/{job_id}/retry", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def retry_job(session: SessionDep, user: CurrentUser, owner_id: OwnerScope, job_id: int) -> JobPublic:
    """A new queued job with the same spec."""
    job = service.retry_job(session, job_id, owner_id)
    audit.record(session, user, "create", "job", job.id, f"retry of job {job_id}")
    return service.job_public(session, job)


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointPublic])
def job_checkpoints(session: SessionDep, owner_id: OwnerScope, job_id: int) -> list[CheckpointPublic]:
    """The job's kept checkpoints, oldest first, each with the metrics at its step."""
    service.get_job(session, job_id, owner_id)
    return [CheckpointPublic.model_validate(c) for c in checkpoints.list_checkpoints(session, job_id)]


@router.get("/{job_id}/checkpoints/{step}/download", response_class=FileResponse)
def download_checkpoint(
    session: SessionDep,
    user: CurrentUser,
    owner_id: OwnerScope,
    job_id: int,
    step: int,
    background: BackgroundTasks,
) -> FileResponse:
    """A zip of the checkpoint's adapter, in the same layout as a finished job's adapter download."""
    service.get_job(session, job_id, owner_id)
    archive = checkpoints.build_archive(checkpoints.get_checkpoint(session, job_id, step))
    audit.record(session, user, "download", "checkpoint", job_id, f"step {step}")
    background.add_task(archive.unlink, missing_ok=True)
    return FileResponse(archive, media_type="application/zip", filename=f"job-{job_id}-step-{step}.zip")


_POINTS = TypeAdapter(list[MetricPointPublic])


@router.get("/{job_id}/metrics", response_model=list[MetricPointPublic])
def job_metrics(
    session: SessionDep, owner_id: OwnerScope, request: Request, job_id: int, after: int = 0
) -> Response:
    """Every logged metric point of the job, in order (ids after `after`). Answers 304 to a matching
    `If-None-Match`; the tag changes when a point is added or removed."""
    newest, count = service.metrics_version(session, job_id, owner_id, after)
    version = f"metrics:{get_engine().url}:{job_id}:{after}:{newest}:{count}"

    def encode() -> bytes:
        points = service.list_metrics(session, job_id, after)
        return _POINTS.dump_json([MetricPointPublic.model_validate(point) for point in points])

    return etag.versioned_json(request, version, encode)


@router.get("/{job_id}/events", response_model=list[JobEventPublic])
def job_events(session: SessionDep, owner_id: OwnerScope, job_id: int) -> list[JobEventPublic]:
    """The job's event log: status changes, errors and tracebacks."""
    return [JobEventPublic.model_validate(event) for event in service.list_events(session, job_id, owner_id)]


def _attempt_at(job_id: int, point_id: int) -> tuple[int, int] | None:
    """(attempt, step) of a point of the job; None when the point is gone (deleted by a resume)."""
    with Session(get_engine()) as session:
        row = session.exec(
            select(MetricPoint.attempt, MetricPoint.step).where(
                MetricPoint.id == point_id, MetricPoint.job_id == job_id
            )
        ).first()
    return None if row is None else (int(row[0]), int(row[1]))


def _kept(job_id: int, cursor: int) -> tuple[int, int]:
    """What the client may keep: the highest step among the job's points it was sent (id <= cursor) that still
    exist, and how many of them exist. A resume deletes every point after its checkpoint's step and its new
    points get higher ids, so everything the client holds beyond this step was replaced; step -1 when none is
    left."""
    with Session(get_engine()) as session:
        step, count = session.exec(
            select(func.max(MetricPoint.step), func.count()).where(
                MetricPoint.job_id == job_id, col(MetricPoint.id) <= cursor
            )
        ).one()
    return (-1 if step is None else int(step)), int(count or 0)


def _reset_event(kept: tuple[int, int], attempt: int | None) -> ServerSentEvent:
    """``event: reset``: drop the points after ``step`` (``points`` of the client's points remain); the new
    run's points follow (``attempt``)."""
    step, count = kept
    return ServerSentEvent(
        data=json.dumps({"step": step, "attempt": attempt, "points": count}), event="reset"
    )


@router.get("/{job_id}/stream")
async def stream_job(
    session: SessionDep,
    owner_id: OwnerScope,
    request: Request,
    job_id: int,
    last_event_id: Annotated[str | None, Header()] = None,
    after: int = 0,
) -> EventSourceResponse:
    """Live metric points (`event: metric`, id = point id) and job status (`event: status`) as SSE.

    A reconnecting client sends `Last-Event-ID` and receives exactly the points it has not seen.
    When a resumed run replaced points the client was sent (they were logged after the checkpoint it resumed
    from), an `event: reset` with `{"step": s, "attempt": a, "points": n}` comes first: drop the points after
    step `s` (`n` of the points sent remain); the new run's points follow. Point ids are never reused, so the id order stays the logging order.
    The stream ends with `event: end` once the job is finished and every point is sent.
    """
    service.get_job(session, job_id, owner_id)
    # A dependency's session lives until the response ends, which for a stream is when the viewer leaves: give its
    # connection back now, or a hundred viewers hold a hundred pooled connections (Postgres: 15 by default).
    session.close()
    start = int(last_event_id) if last_event_id and last_event_id.isdigit() else max(after, 0)

    async def events() -> AsyncIterator[ServerSentEvent | bytes]:
        async with live.get_hub().subscribe(job_id) as feed:
            async for event in _stream_events(request, feed, start):
                yield event

    return EventSourceResponse(events(), ping=15)


async def _stream_events(
    request: Request, feed: live.JobFeed, start: int
) -> AsyncIterator[ServerSentEvent | bytes]:
    """The stream's events: points after ``start`` from the job's shared feed (app/services/live.py).

    Points older than the feed's buffer are read from the database by this stream alone (a fresh page, a
    reconnect); then it walks the buffer the feed fills once per tick for every viewer.
    The attempt of the last point sent and the highest step the client holds are remembered: a point of another
    attempt means a resume happened in between, and if it deleted steps the client holds, a ``reset`` goes first.
    A client continuing after a point that no longer exists was sent deleted points: it gets the ``reset`` at once.
    """
    job_id = feed.job_id
    cursor = start
    last_status: str | None = None
    last_attempt: int | None = None
    held_step = -1  # the highest step the client has been sent
    if cursor > 0:
        last_point = await asyncio.to_thread(_attempt_at, job_id, cursor)
        if last_point is None:
            kept = await asyncio.to_thread(_kept, job_id, cursor)
            held_step = kept[0]
            yield _reset_event(kept, None)
        else:
            last_attempt, held_step = last_point
    while True:
        changed = feed.changed  # taken before looking, so news that comes while we send is not missed
        base = feed.base
        if base is None:  # the feed's first read is under way
            await live.wait_for_change(changed)
            continue
        caught_up = cursor >= base
        if caught_up:
            points = feed.after(cursor)
        else:
            points = await asyncio.to_thread(live.read_points, job_id, cursor)
            if len(points) < live.READ_LIMIT and feed.base == base:
                caught_up = True  # nothing else exists up to the feed's buffer
        # The points' frames are encoded once by the feed; a wake-up's points go out as one write (a viewer
        # that fell behind catches up in one send, not one per point).
        frames: list[bytes] = []
        for point in points:
            if last_attempt is not None and point.attempt != last_attempt:
                kept = await asyncio.to_thread(_kept, job_id, cursor)
                if held_step > kept[0]:
                    if frames:
                        yield b"".join(frames)
                        frames = []
                    yield _reset_event(kept, point.attempt)
                    held_step = kept[0]
            last_attempt = point.attempt
            held_step = max(held_step, point.step)
            cursor = point.id
            frames.append(point.frame)
        if frames:
            yield b"".join(frames)
        if caught_up and cursor < base:
            cursor = base
        status = feed.status
        if status is not None and status != last_status:
            last_status = status
            yield ServerSentEvent(data=status, event="status")
        if feed.finished and caught_up and cursor >= feed.cursor:
            if status is not None:
                yield ServerSentEvent(data=status, event="end")
            return
        if caught_up and cursor >= feed.cursor:
            # EventSourceResponse ends the stream when the client leaves; this check is a backstop, made only
            # before waiting (once per wake-up of a caught-up viewer, not once per point of one catching up).
            if await request.is_disconnected():
                return
            await live.wait_for_change(changed)
