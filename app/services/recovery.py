"""Crash recovery: running jobs whose worker vanished are requeued (resuming from their last checkpoint)
or, after too many attempts, failed. Runs periodically in the web app and once when a worker starts.

A running job's worker writes ``heartbeat_at`` every few seconds from a thread of its own (independent of
how long a training step takes). Each queue delivery carries the job's ``run_token``; requeueing issues a new
token, so a worker still holding the old one (a stalled process, a redelivered message) cannot run or finish
the job any more: every transition is a conditional update on the token.

Nothing is requeued while its holder still heartbeats: the reaper waits for ``heartbeat_timeout_seconds`` of
silence, and a starting worker that finds jobs under its own name first watches their heartbeat
(:func:`recover_orphans`), because an orphaned worker of the same name may still be training them.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from app.core.db import session_scope
from app.core.models import Job, JobStatus, utcnow
from app.core.settings import get_settings
from app.services.checkpoints import latest_checkpoint
from app.services.jobs import add_event
from app.services.run_tokens import new_run_token

log = logging.getLogger(__name__)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        from datetime import UTC

        return moment.replace(tzinfo=UTC)
    return moment


def _last_sign_of_life(job: Job) -> datetime | None:
    return _aware(job.heartbeat_at) or _aware(job.started_at)


def requeue_or_fail(session: Session, job: Job, reason: str) -> str | None:
    """Requeue a running job whose worker is gone, or fail it after ``max_attempts`` starts.

    Returns "requeued", "failed", or None when another process changed the job first (nothing done).
    """
    from app.core.queue import enqueue_training

    settings = get_settings()
    assert job.id is not None
    old_token = job.run_token
    checkpoint = latest_checkpoint(session, job.id)
    resume = f"it resumes from the checkpoint at step {checkpoint.step}" if checkpoint else "it starts over"
    guard = [col(Job.id) == job.id, col(Job.status) == JobStatus.running]
    guard.append(col(Job.run_token) == old_token if old_token is not None else col(Job.run_token).is_(None))
    if job.attempt >= settings.max_attempts:
        error = (
            f"{reason}. The job was started {job.attempt} time(s), the most allowed "
            f"(PEFT_STUDIO_MAX_ATTEMPTS={settings.max_attempts}), so it is marked failed; resume it from its "
            "last checkpoint or retry it."
        )
        result = session.execute(
            update(Job)
            .where(*guard)
            .values(status=JobStatus.failed, error=error, finished_at=utcnow(), run_token=None)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return None
        add_event(session, job.id, "error", error)
        session.commit()
        return "failed"
    token = new_run_token()
    result = session.execute(
        update(Job)
        .where(*guard)
        .values(status=JobStatus.queued, run_token=token, worker=None, heartbeat_at=None)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return None
    add_event(
        session,
        job.id,
        "recovery",
        f"{reason}; requeued (attempt {job.attempt + 1} of {settings.max_attempts}), {resume}",
    )
    session.commit()
    try:
        task_id = enqueue_training(job.id, token)
    except Exception as exc:
        # Put it back as it was (running, stale): the next pass tries again.
        session.execute(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.run_token) == token, col(Job.status) == JobStatus.queued)
            .values(status=JobStatus.running, run_token=old_token)
        )
        session.commit()
        log.warning("could not requeue job %s (%s); will try again", job.id, exc)
        return None
    session.execute(update(Job).where(col(Job.id) == job.id).values(task_id=task_id))
    session.commit()
    return "requeued"


def reap(now: datetime | None = None) -> dict[int, str]:
    """Requeue or fail every running job with no heartbeat for ``heartbeat_timeout_seconds``."""
    settings = get_settings()
    cutoff = (now or utcnow()) - timedelta(seconds=settings.heartbeat_timeout_seconds)
    done: dict[int, str] = {}
    with session_scope() as session:
        running = session.exec(select(Job).where(col(Job.status) == JobStatus.running)).all()
        for job in running:
            seen = _last_sign_of_life(job)
            if seen is None or seen >= cutoff:
                continue  # alive, or never claimed by a worker (claiming sets both times)
            since = f" since {seen:%H:%M:%S} UTC"
            reason = (
                f"worker {job.worker or '?'} stopped responding at step {job.current_step} "
                f"(no heartbeat{since}, timeout {settings.heartbeat_timeout_seconds:g} s)"
            )
            outcome = requeue_or_fail(session, job, reason)
            if outcome:
                assert job.id is not None
                done[job.id] = outcome
                log.warning("job %s: %s, %s", job.id, reason, outcome)
    return done


MISSED_BEATS = 3  # a holder that has not beaten for this many heartbeat intervals is taken for dead


def _beats(session: Session, worker_name: str) -> dict[int, tuple[str | None, datetime | None]]:
    jobs = session.exec(
        select(Job).where(col(Job.status) == JobStatus.running, col(Job.worker) == worker_name)
    ).all()
    return {job.id: (job.run_token, _aware(job.heartbeat_at)) for job in jobs if job.id is not None}


def recover_orphans(worker_name: str, sleep: Callable[[float], None] = time.sleep) -> dict[int, str]:
    """Requeue jobs "running" under this worker's name whose holder no longer heartbeats.

    A job carrying the name is not proof that its holder is dead: an orphaned worker of an earlier ``serve``
    (or a second worker started under the same name) may still be training it. So a job is requeued only
    when its heartbeat stays still for ``MISSED_BEATS`` heartbeat intervals: at once when it is already that
    old, otherwise after watching it that long (a live holder writes it every ``heartbeat_seconds``).
    """
    settings = get_settings()
    quiet = timedelta(seconds=MISSED_BEATS * settings.heartbeat_seconds)
    with session_scope() as session:
        seen = _beats(session, worker_name)
    if not seen:
        return {}
    newest = max((beat for _, beat in seen.values() if beat is not None), default=None)
    if newest is not None and utcnow() - newest < quiet:
        sleep((quiet - (utcnow() - newest)).total_seconds() + 0.5)
    done: dict[int, str] = {}
    with session_scope() as session:
        now_seen = _beats(session, worker_name)
        for job_id, (token, beat) in seen.items():
            if job_id not in now_seen:
                continue  # finished or requeued meanwhile
            if now_seen[job_id] != (token, beat):
                log.warning("job %s: its holder %s still heartbeats; it is left alone", job_id, worker_name)
                continue
            if beat is not None and utcnow() - beat < quiet:
                continue  # cannot happen after the wait above; kept so a short sleep never requeues a live job
            job = session.get(Job, job_id)
            if job is None:
                continue
            reason = f"worker {worker_name} restarted while running the job (at step {job.current_step})"
            outcome = requeue_or_fail(session, job, reason)
            if outcome:
                done[job_id] = outcome
    return done


async def reaper_loop() -> None:
    """Run ``reap`` every ``reaper_interval_seconds`` until cancelled (the web app's lifespan owns it)."""
    interval = get_settings().reaper_interval_seconds
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(reap)
        except Exception:
            log.exception("the job reaper failed; trying again in %s s", interval)


def start_reaper() -> "asyncio.Task[None] | None":
    """Start ``reaper_loop`` on the running event loop (None when the interval is 0)."""
    if get_settings().reaper_interval_seconds <= 0:
        return None
    return asyncio.get_running_loop().create_task(reaper_loop(), name="job-reaper")
