"""A training job's status transitions on the worker side, and nowhere else in ``worker/``.

The worker moves a job queued -> running (``start_job``: the claim), running -> succeeded or cancelled
(``finish_job``) and running -> failed (``mark_failed``). Every transition is a conditional write fenced by the
job's run token, so a worker that lost the job to a requeue (app/services/recovery.py issues a new token)
changes nothing. The web side's transitions (create, cancel while queued, resume, retry, requeue) live in
app/services/jobs.py and app/services/recovery.py.
"""

from dataclasses import dataclass

from sqlalchemy import update
from sqlmodel import col

from app.core.db import session_scope
from app.core.models import Job, JobStatus, utcnow
from app.core.spec import JobSpec
from app.services.jobs import add_event
from app.services.run_tokens import new_run_token


class JobCancelled(Exception):
    """Raised when a delivered job is not to be run: cancelled, gone, requeued since, or claimed by another."""


@dataclass
class Claim:
    """A job this worker holds: its spec, the token of this run, and which start this is."""

    spec: JobSpec
    run_token: str
    attempt: int


def start_job(job_id: int, worker_name: str, run_token: str | None = None) -> Claim:
    """Claim a queued job atomically: only the delivery whose token matches runs it, once.

    A redelivered message, one superseded by a requeue (new token), or one for a cancelled job is skipped
    (JobCancelled). The running job gets a fresh token that its heartbeat and final writes are checked against.
    """
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobCancelled(f"job {job_id} no longer exists")
        if job.status != JobStatus.queued or job.cancel_requested:
            raise JobCancelled(f"job {job_id} is {job.status}; nothing to do")
        if run_token is not None and job.run_token != run_token:
            raise JobCancelled(f"job {job_id} was requeued since this message was sent; skipping it")
        guard = [
            col(Job.id) == job_id,
            col(Job.status) == JobStatus.queued,
            col(Job.cancel_requested).is_(False),
        ]
        guard.append(col(Job.run_token) == job.run_token if job.run_token else col(Job.run_token).is_(None))
        token, attempt, now = new_run_token(), job.attempt + 1, utcnow()
        result = session.execute(
            update(Job)
            .where(*guard)
            .values(
                status=JobStatus.running,
                run_token=token,
                attempt=attempt,
                worker=worker_name,
                started_at=job.started_at or now,
                heartbeat_at=now,
                finished_at=None,
                error=None,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            raise JobCancelled(f"job {job_id} was claimed or changed by someone else; skipping it")
        again = f" (attempt {attempt})" if attempt > 1 else ""
        add_event(session, job_id, "status", f"running on {worker_name}{again}")
        session.commit()
        return Claim(JobSpec.model_validate(job.spec), token, attempt)


def holds(job: Job | None, run_token: str | None) -> bool:
    """Whether ``job`` exists and still carries ``run_token`` (any token when it is None)."""
    return job is not None and (run_token is None or job.run_token == run_token)


def finish_job(
    job_id: int, status: JobStatus, message: str, error: str | None = None, run_token: str | None = None
) -> None:
    """End a running job as ``status`` (succeeded or cancelled) with ``message`` in its events.

    With ``run_token``, only while the job still carries that token.
    """
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not holds(job, run_token):
            return
        job.status = status
        job.finished_at = utcnow()
        job.error = error
        if status == JobStatus.succeeded:
            job.progress = 1.0
            job.eta_seconds = 0.0
        add_event(session, job_id, "status", message)
        session.add(job)
        session.commit()


def mark_failed(job_id: int, error: str, traceback_text: str | None, run_token: str | None = None) -> None:
    """Record a failure: a readable error on the job and the traceback in its event log.

    With ``run_token``, only while the job still carries that token (a worker that lost the job to a
    requeue does not fail it).
    """
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status.is_terminal or not holds(job, run_token):
            return
        job.status = JobStatus.failed
        job.error = error
        job.finished_at = utcnow()
        add_event(session, job_id, "error", error)
        if traceback_text:
            add_event(session, job_id, "traceback", traceback_text)
        session.add(job)
        session.commit()
