"""/api/v1/jobs, including the live Server-Sent Events stream."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, status
from sqlmodel import Session
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from app.db import get_engine
from app.deps import SessionDep
from app.models import JobEventPublic, JobPublic, JobsPublic, MetricPointPublic
from app.services import jobs as service
from app.services.datasets import get_dataset
from app.settings import get_settings
from app.spec import JobSpec

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def create_job(session: SessionDep, spec: JobSpec) -> JobPublic:
    """Validate a job spec and queue it for a worker."""
    return service.job_public(session, service.create_job(session, spec))


@router.post("/estimate")
async def estimate_job(session: SessionDep, spec: JobSpec) -> dict[str, Any]:
    """Before launch: the exact trainable and total parameter counts of the spec's base model with its method
    (built on the meta device; no weights are loaded) and an estimate of training memory, in bytes by kind."""
    service.validate_spec(session, spec)
    profile = get_dataset(session, spec.dataset_id).profile
    from worker.estimate import estimate_job as estimate  # torch loads on first use, never at web start-up

    result = await asyncio.to_thread(estimate, spec, profile)
    return result.model_dump()


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, offset: int = 0, limit: int = 100) -> JobsPublic:
    """Jobs, newest first."""
    rows, count = service.list_jobs(session, max(offset, 0), min(max(limit, 1), 1000))
    return JobsPublic(data=[service.job_public(session, row) for row in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(session: SessionDep, job_id: int) -> JobPublic:
    """One job: status, progress, error."""
    return service.job_public(session, service.get_job(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(session: SessionDep, job_id: int) -> JobPublic:
    """Cancel a queued job at once, or stop a running one within a few seconds."""
    return service.job_public(session, service.cancel_job(session, job_id))


@router.get("/{job_id}/metrics", response_model=list[MetricPointPublic])
def job_metrics(session: SessionDep, job_id: int, after: int = 0) -> list[MetricPointPublic]:
    """Every logged metric point of the job, in order (ids after `after`)."""
    return [MetricPointPublic.model_validate(point) for point in service.list_metrics(session, job_id, after)]


@router.get("/{job_id}/events", response_model=list[JobEventPublic])
def job_events(session: SessionDep, job_id: int) -> list[JobEventPublic]:
    """The job's event log: status changes, errors and tracebacks."""
    return [JobEventPublic.model_validate(event) for event in service.list_events(session, job_id)]


def _poll(job_id: int, after: int) -> tuple[list[MetricPointPublic], JobPublic]:
    with Session(get_engine()) as session:
        points = [
            MetricPointPublic.model_validate(p) for p in service.list_metrics(session, job_id, after, 1000)
        ]
        job = service.job_public(session, service.get_job(session, job_id))
    return points, job


@router.get("/{job_id}/stream")
async def stream_job(
    session: SessionDep,
    request: Request,
    job_id: int,
    last_event_id: Annotated[str | None, Header()] = None,
    after: int = 0,
) -> EventSourceResponse:
    """Live metric points (`event: metric`, id = point id) and job status (`event: status`) as SSE.

    A reconnecting client sends `Last-Event-ID` and receives exactly the points it has not seen.
    The stream ends with `event: end` once the job is finished and every point is sent.
    """
    service.get_job(session, job_id)
    start = int(last_event_id) if last_event_id and last_event_id.isdigit() else max(after, 0)
    poll_seconds = get_settings().stream_poll_seconds

    async def events() -> AsyncIterator[ServerSentEvent]:
        cursor = start
        last_status: str | None = None
        while True:
            points, job = await asyncio.to_thread(_poll, job_id, cursor)
            for point in points:
                cursor = point.id
                yield ServerSentEvent(data=point.model_dump_json(), event="metric", id=str(point.id))
            snapshot = json.dumps(
                {
                    "status": job.status,
                    "progress": job.progress,
                    "step": job.current_step,
                    "total_steps": job.total_steps,
                    "eta_seconds": job.eta_seconds,
                    "error": job.error,
                    "adapter_id": job.adapter_id,
                }
            )
            if snapshot != last_status:
                last_status = snapshot
                yield ServerSentEvent(data=snapshot, event="status")
            if job.status.is_terminal and not points:
                yield ServerSentEvent(data=snapshot, event="end")
                return
            if await request.is_disconnected():
                return
            if not points:
                await asyncio.sleep(poll_seconds)

    return EventSourceResponse(events(), ping=15)
