"""Jobs: validate a spec against the datasets and model, queue it, list, cancel, report progress."""

from typing import Any

from sqlmodel import Session, col, func, select

from app.core.autoconfig import resolve_spec
from app.core.errors import JobStateError, NotFound, ServiceUnavailable
from app.core.models import Adapter, Job, JobEvent, JobPublic, JobStatus, MetricPoint, Worker, utcnow
from app.core.netguard import check_mlflow_uri
from app.core.spec import JobSpec
from app.core.tasks import spec_validator
from app.services.run_tokens import new_run_token


def validate_spec(session: Session, spec: JobSpec, owner_id: int | None = None) -> None:
    """Check everything a spec refers to, so a queued job does not fail on its first step.

    Raises InvalidSpec naming the field (and the row, where a dataset is at fault) and what is expected.
    Each task's checks live with the task (its ``TaskInfo.validate``, app/core/tasks.py); they run cheapest
    first and stop at the first problem, and none of them loads a model or reads a dataset file (they use the
    profile stored at upload).
    """
    spec_validator(spec.task)(session, spec, owner_id)


def add_event(session: Session, job_id: int, kind: str, message: str) -> None:
    """Record something that happened to a job (committed by the caller)."""
    session.add(JobEvent(job_id=job_id, kind=kind, message=message))


def create_job(session: Session, spec: JobSpec, owner_id: int | None = None) -> Job:
    """Validate and queue a job; if the queue cannot take it, nothing is kept."""
    from app.core.queue import enqueue_training
    from app.services.accounts import scope_for
    from app.services.quota import check_job_cap

    scope = scope_for(session, owner_id)
    validate_spec(session, spec, scope)  # the admin may train on anyone's dataset
    check_mlflow_uri(spec.tracking.mlflow_tracking_uri, local_allowed=scope is None)
    check_job_cap(session, owner_id)
    spec, auto_explanation = resolve_spec(session, spec)  # the job stores what it will run with
    job = Job(
        owner_id=owner_id,
        name=spec.name or f"{spec.method} on dataset {spec.dataset_id}",
        spec=spec.model_dump(mode="json"),
        method=spec.method,
        base_model=spec.base_model,
        dataset_id=spec.dataset_id,
    )
    job.run_token = new_run_token()
    session.add(job)
    session.flush()
    assert job.id is not None
    add_event(session, job.id, "status", "queued")
    if auto_explanation:
        add_event(session, job.id, "config", auto_explanation)
    reason = waiting_reason(session, job)
    if reason:
        add_event(session, job.id, "waiting", f"{reason}; the job stays queued until one connects")
    session.commit()
    try:
        job.task_id = enqueue_training(job.id, job.run_token)
    except Exception as exc:
        # Events first: they reference the job, and SQLite/Postgres enforce the foreign key.
        for event in session.exec(select(JobEvent).where(JobEvent.job_id == job.id)).all():
            session.delete(event)
        session.flush()
        session.delete(job)
        session.commit()
        raise ServiceUnavailable(
            f"The job queue is not reachable ({type(exc).__name__}: {exc}); nothing was queued, try again."
        ) from exc
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def get_job(session: Session, job_id: int, owner_id: int | None = None) -> Job:
    """One job, or NotFound (also when ``owner_id`` is given and it belongs to someone else)."""
    job = session.get(Job, job_id)
    if job is None or (owner_id is not None and job.owner_id != owner_id):
        raise NotFound(f"Job {job_id} does not exist.")
    return job


def list_jobs(
    session: Session, offset: int = 0, limit: int = 100, owner_id: int | None = None
) -> tuple[list[Job], int]:
    """Jobs, newest first, and how many there are (only ``owner_id``'s when given)."""
    where = [Job.owner_id == owner_id] if owner_id is not None else []
    count = session.exec(select(func.count()).select_from(Job).where(*where)).one()
    rows = session.exec(
        select(Job).where(*where).order_by(col(Job.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), count


def waiting_reason(session: Session, job: Job) -> str | None:
    """For a queued job that no live worker can take (none consumes its queue): why it waits, else None.

    The job is not refused: a matching worker may connect later, and then the reason goes away.
    """
    if job.status != JobStatus.queued:
        return None
    from app.core.queue import queue_for
    from app.core.spec import ResourceSettings
    from app.services.workers import is_alive

    try:
        resources = ResourceSettings.model_validate(job.spec.get("resources") or {})
    except ValueError:
        return None
    queue = queue_for(resources)
    workers = session.exec(select(Worker).where(col(Worker.status) == "online")).all()
    if any(queue in worker.queues for worker in workers if is_alive(worker)):
        return None
    return _no_worker_reason(resources)


def _no_worker_reason(resources: Any) -> str:
    """Why a job with these resources waits when no live worker consumes its queue."""
    if resources.wants_gpu:
        needs = []
        if resources.gpu_class:
            needs.append(f"at least {resources.gpu_class.removesuffix('gb')} GB of GPU memory")
        if resources.num_processes > 1:
            needs.append(f"{resources.num_processes} GPUs")
        return "no worker with a GPU" + (f" ({', '.join(needs)})" if needs else "") + " is connected"
    if resources.accelerator == "cpu":
        return "no CPU worker is connected"
    return "no worker is connected"


def _queue_of(spec: dict[str, Any]) -> str:
    from app.core.queue import queue_for
    from app.core.spec import ResourceSettings

    try:
        return queue_for(ResourceSettings.model_validate(spec.get("resources") or {}))
    except ValueError:
        return queue_for(None)


def queue_position(session: Session, job: Job) -> int | None:
    """For a queued job: 1 when it is next in its queue, 2 when one job waits before it, ...; else None.

    Jobs wait in the queue their resources send them to (app/core/queue.py: CPU, any, GPU of a class), and workers
    take them oldest first, so the position counts the queued jobs of the same queue with a smaller id. A
    resumed job keeps its id, so it counts as older than it is: the position is a lower bound then.
    """
    if job.status != JobStatus.queued:
        return None
    queue = _queue_of(job.spec)
    # only the specs (where the queue is), not whole rows, of the jobs waiting before it
    earlier = session.exec(
        select(Job.spec).where(col(Job.status) == JobStatus.queued, col(Job.id) < job.id)
    ).all()
    return 1 + sum(1 for spec in earlier if _queue_of(dict(spec)) == queue)


def job_public(session: Session, job: Job) -> JobPublic:
    """The public shape of a job, with its adapter's id once it has one (and, when queued, its place in the
    queue and why it waits)."""
    adapter_id = session.exec(select(Adapter.id).where(Adapter.job_id == job.id)).first()
    return JobPublic.model_validate(
        job,
        update={
            "adapter_id": adapter_id,
            "waiting_reason": waiting_reason(session, job),
            "queue_position": queue_position(session, job),
        },
    )


def jobs_public(session: Session, jobs: list[Job]) -> list[JobPublic]:
    """The public shapes of many jobs with a fixed number of queries, however many there are (``job_public``
    per row would ask for each one's adapter, and each queued one's workers and queue)."""
    ids = [job.id for job in jobs]
    adapters: dict[int | None, int | None] = dict(
        session.exec(select(Adapter.job_id, Adapter.id).where(col(Adapter.job_id).in_(ids))).all()
        if ids
        else []
    )
    queued = [job for job in jobs if job.status == JobStatus.queued]
    reasons: dict[int | None, str | None] = {}
    positions: dict[int | None, int | None] = {}
    if queued:
        from app.core.queue import queue_for
        from app.core.spec import ResourceSettings
        from app.services.workers import is_alive

        online = session.exec(select(Worker).where(col(Worker.status) == "online")).all()
        live_queues = {queue for worker in online if is_alive(worker) for queue in worker.queues}
        waiting = session.exec(
            select(Job.id, Job.spec)
            .where(col(Job.status) == JobStatus.queued, col(Job.id) <= max(job.id or 0 for job in queued))
            .order_by(col(Job.id))
        ).all()
        seen: dict[str, int] = {}
        place: dict[int, int] = {}
        for other_id, spec in waiting:
            queue = _queue_of(dict(spec))
            seen[queue] = seen.get(queue, 0) + 1
            place[int(other_id or 0)] = seen[queue]
        for job in queued:
            positions[job.id] = place.get(int(job.id or 0))
            try:
                resources = ResourceSettings.model_validate(job.spec.get("resources") or {})
            except ValueError:
                reasons[job.id] = None
                continue
            reasons[job.id] = None if queue_for(resources) in live_queues else _no_worker_reason(resources)
    return [
        JobPublic.model_validate(
            job,
            update={
                "adapter_id": adapters.get(job.id),
                "waiting_reason": reasons.get(job.id),
                "queue_position": positions.get(job.id),
            },
        )
        for job in jobs
    ]


def metrics_version(
    session: Session, job_id: int, owner_id: int | None, after_id: int = 0
) -> tuple[int, int]:
    """(newest point id, point count) after ``after_id`` of a job ``owner_id`` may see (NotFound otherwise, as
    ``get_job``): one query, indexed, that changes whenever the job's points do (ids are never reused, so a
    replaced point changes the newest id or the count). A poll that finds nothing new costs only this."""
    points = (MetricPoint.job_id == job_id, col(MetricPoint.id) > after_id)
    newest = select(func.max(MetricPoint.id)).where(*points).scalar_subquery()
    count = select(func.count()).select_from(MetricPoint).where(*points).scalar_subquery()
    row = session.exec(select(Job.owner_id, newest, count).where(Job.id == job_id)).first()
    if row is None or (owner_id is not None and row[0] != owner_id):
        raise NotFound(f"Job {job_id} does not exist.")
    return int(row[1] or 0), int(row[2] or 0)


def cancel_job(session: Session, job_id: int, owner_id: int | None = None) -> Job:
    """Cancel a queued job at once, or ask a running one to stop (it does within a few seconds)."""
    job = get_job(session, job_id, owner_id)
    if job.status.is_terminal:
        raise JobStateError(
            f"Job {job_id} is already {job.status}; only queued or running jobs can be cancelled."
        )
    job.cancel_requested = True
    if job.status == JobStatus.queued:
        job.status = JobStatus.cancelled
        job.finished_at = utcnow()
        job.run_token = None  # a worker that still receives the message skips it
        add_event(session, job_id, "status", "cancelled before it started")
        _revoke(job.task_id)
    else:
        add_event(session, job_id, "cancel", "cancel requested; the worker stops at the next step")
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def list_metrics(
    session: Session, job_id: int, after_id: int = 0, limit: int = 10_000, owner_id: int | None = None
) -> list[MetricPoint]:
    """Metric points of a job in logging order, after a given point id."""
    get_job(session, job_id, owner_id)
    statement = (
        select(MetricPoint)
        .where(MetricPoint.job_id == job_id, col(MetricPoint.id) > after_id)
        .order_by(col(MetricPoint.id))
        .limit(limit)
    )
    return list(session.exec(statement).all())


def list_events(session: Session, job_id: int, owner_id: int | None = None) -> list[JobEvent]:
    """A job's event log, oldest first."""
    get_job(session, job_id, owner_id)
    return list(
        session.exec(select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.id))).all()
    )


def _revoke(task_id: str | None) -> None:
    """Best effort: tell Redis-connected workers to drop the task (the run token already makes them skip it)."""
    from app.core.settings import get_settings

    if not task_id or not get_settings().resolved_broker_url.startswith("redis"):
        return  # the embedded SQLite broker has no broadcast; the worker skips the job by its token

    def send() -> None:
        from app.core.queue import get_celery

        try:
            get_celery().control.revoke(task_id)
        except Exception:  # never let a broker hiccup fail the cancel itself
            pass

    import threading

    threading.Thread(target=send, name=f"revoke-{task_id}", daemon=True).start()


def resume_job(session: Session, job_id: int, owner_id: int | None = None) -> Job:
    """Queue a failed or cancelled job again; the worker continues from its last checkpoint."""
    from app.core.queue import enqueue_training
    from app.services.checkpoints import latest_checkpoint

    job = get_job(session, job_id, owner_id)
    if job.status not in (JobStatus.failed, JobStatus.cancelled):
        raise JobStateError(
            f"Job {job_id} is {job.status}; only failed or cancelled jobs can be resumed."
            + (" Use retry to train it again as a new job." if job.status == JobStatus.succeeded else "")
        )
    checkpoint = latest_checkpoint(session, job_id)
    if checkpoint is None:
        raise JobStateError(
            f"Job {job_id} has no checkpoint to resume from (it stopped before its first one was saved); "
            f"retry it instead (POST /api/v1/jobs/{job_id}/retry)."
        )
    previous = (job.status, job.error, job.finished_at, job.cancel_requested, job.run_token)
    job.status = JobStatus.queued
    job.error = None
    job.finished_at = None
    job.cancel_requested = False
    job.eta_seconds = None
    job.attempt = 0  # a person asked: the automatic-retry budget starts again
    job.run_token = new_run_token()
    add_event(
        session,
        job_id,
        "status",
        f"resume requested: continues from the checkpoint at step {checkpoint.step}",
    )
    session.add(job)
    session.commit()
    try:
        job.task_id = enqueue_training(job_id, job.run_token)
    except Exception as exc:
        job.status, job.error, job.finished_at, job.cancel_requested, job.run_token = previous
        add_event(session, job_id, "error", f"resume failed: the job queue is not reachable ({exc})")
        session.add(job)
        session.commit()
        raise ServiceUnavailable(
            f"The job queue is not reachable ({type(exc).__name__}: {exc}); the job was not resumed, try again."
        ) from exc
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def retry_job(session: Session, job_id: int, owner_id: int | None = None) -> Job:
    """A new queued job with the same spec (validated again: its dataset or model may have gone).

    Only failed or cancelled jobs: retrying a succeeded one would silently train the same thing again (to
    change something and train again, clone it: /jobs/new?clone=<id>), and an unfinished one is still going.
    """
    job = get_job(session, job_id, owner_id)
    if job.status not in (JobStatus.failed, JobStatus.cancelled):
        hint = (
            f" To train it again with changes, clone it into the job form (/jobs/new?clone={job_id})."
            if job.status == JobStatus.succeeded
            else " Wait for it to finish, or cancel it first."
        )
        raise JobStateError(
            f"Job {job_id} is {job.status}; only failed or cancelled jobs can be retried.{hint}"
        )
    spec = JobSpec.model_validate(job.spec)
    base_name = job.name.removesuffix(" (retry)")
    spec = spec.model_copy(update={"name": f"{base_name} (retry)"[:200]})
    new_job = create_job(session, spec, job.owner_id)
    add_event(session, job_id, "retry", f"retried as job {new_job.id}")
    add_event(session, new_job.id or 0, "retry", f"retry of job {job_id}")
    session.commit()
    session.refresh(new_job)
    return new_job
