"""Workers: the live list of training workers, their hardware and the job each one runs."""

from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from app.core.models import Job, Worker, WorkerPublic
from app.core.settings import get_settings

MISSED_HEARTBEATS = 3


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def is_alive(worker: Worker, now: datetime | None = None) -> bool:
    """Online and heard from within three heartbeats."""
    now = now or datetime.now(UTC)
    window = timedelta(seconds=MISSED_HEARTBEATS * get_settings().worker_heartbeat_seconds)
    return worker.status == "online" and now - _aware(worker.heartbeat_at) <= window


def worker_public(worker: Worker, now: datetime | None = None) -> WorkerPublic:
    """The public shape of a worker, with whether it is alive and busy."""
    return WorkerPublic.model_validate(
        worker, update={"alive": is_alive(worker, now), "busy": worker.current_job_id is not None}
    )


def list_workers(
    session: Session, include_gone: bool = False, owner_id: int | None = None
) -> list[WorkerPublic]:
    """Workers, live ones first, by name; gone ones (offline or silent) only when asked for.

    With ``owner_id`` (anyone but the admin), a worker's current job is shown only when it is that user's:
    another user's job id (and so its name) is hidden, and the worker only reads as busy.
    """
    now = datetime.now(UTC)
    rows = [worker_public(row, now) for row in session.exec(select(Worker).order_by(col(Worker.name))).all()]
    if not include_gone:
        rows = [row for row in rows if row.alive]
    if owner_id is not None:
        ids = [row.current_job_id for row in rows if row.current_job_id is not None]
        owned = (
            set(session.exec(select(Job.id).where(col(Job.id).in_(ids), Job.owner_id == owner_id)).all())
            if ids
            else set()
        )
        for row in rows:
            if row.current_job_id is not None and row.current_job_id not in owned:
                row.current_job_id = None
    return sorted(rows, key=lambda row: (not row.alive, row.name))


def current_jobs(session: Session, workers: list[WorkerPublic]) -> dict[int, Job]:
    """The jobs the given workers are running, by job id."""
    ids = [w.current_job_id for w in workers if w.current_job_id is not None]
    if not ids:
        return {}
    return {job.id: job for job in session.exec(select(Job).where(col(Job.id).in_(ids))).all() if job.id}
