"""Jobs: validate a spec against the datasets and model, queue it, list, cancel, report progress."""

from sqlmodel import Session, col, func, select

from app.base_models import resolve_base_model
from app.errors import InvalidSpec, JobStateError, NotFound, ServiceUnavailable
from app.models import Adapter, Dataset, Job, JobEvent, JobPublic, JobStatus, MetricPoint, utcnow
from app.services.datasets import get_dataset
from app.spec import JobSpec


def _check_columns(dataset: Dataset, spec: JobSpec, field_prefix: str) -> None:
    for field, column in (("text_column", spec.text_column), ("label_column", spec.label_column)):
        if column not in dataset.columns:
            raise InvalidSpec(
                f"{field_prefix}dataset {dataset.id} has no column {column!r}; its columns are "
                f"{', '.join(dataset.columns)}.",
                field=field,
            )
    text_info = dataset.profile.get("columns", {}).get(spec.text_column, {})
    if text_info.get("type") not in ("string", None):
        raise InvalidSpec(
            f"Column {spec.text_column!r} of dataset {dataset.id} holds {text_info.get('type')} values, not text.",
            field="text_column",
        )
    label_info = dataset.profile.get("columns", {}).get(spec.label_column, {})
    if label_info.get("missing"):
        raise InvalidSpec(
            f"Column {spec.label_column!r} of dataset {dataset.id} is empty in {label_info['missing']} row(s); "
            "every training row needs a label.",
            field="label_column",
        )


def validate_spec(session: Session, spec: JobSpec) -> None:
    """Check everything a spec refers to, so a queued job does not fail on its first step."""
    try:
        dataset = get_dataset(session, spec.dataset_id)
    except NotFound:
        raise InvalidSpec(f"Dataset {spec.dataset_id} does not exist.", field="dataset_id") from None
    _check_columns(dataset, spec, "")
    label_info = dataset.profile.get("columns", {}).get(spec.label_column, {})
    if spec.task == "sequence-classification":
        classes = label_info.get("distinct", 0)
        if classes < 2:
            raise InvalidSpec(
                f"Column {spec.label_column!r} has {classes} distinct value(s); classification needs at least 2.",
                field="label_column",
            )
        if "value_counts" not in label_info:
            raise InvalidSpec(
                f"Column {spec.label_column!r} has {classes} distinct values in {dataset.row_count} rows: it does "
                "not look like a label column (at most 100 classes, repeated across rows).",
                field="label_column",
            )
    if spec.validation_dataset_id is not None:
        try:
            validation = get_dataset(session, spec.validation_dataset_id)
        except NotFound:
            raise InvalidSpec(
                f"Validation dataset {spec.validation_dataset_id} does not exist.", field="validation_dataset_id"
            ) from None
        _check_columns(validation, spec, "validation ")
    elif spec.validation_fraction > 0:
        held_out = round(dataset.row_count * spec.validation_fraction)
        if held_out < 1 or dataset.row_count - held_out < 1:
            raise InvalidSpec(
                f"A validation fraction of {spec.validation_fraction} of {dataset.row_count} rows leaves "
                f"{held_out} for validation and {dataset.row_count - held_out} for training; both need at least 1.",
                field="validation_fraction",
            )
    model = resolve_base_model(spec.base_model)
    if model.max_positions is not None and spec.training.max_length > model.max_positions:
        raise InvalidSpec(
            f"max_length {spec.training.max_length} is beyond what {spec.base_model!r} accepts "
            f"({model.max_positions} positions).",
            field="training.max_length",
        )


def add_event(session: Session, job_id: int, kind: str, message: str) -> None:
    """Record something that happened to a job (committed by the caller)."""
    session.add(JobEvent(job_id=job_id, kind=kind, message=message))


def create_job(session: Session, spec: JobSpec) -> Job:
    """Validate and queue a job; if the queue cannot take it, nothing is kept."""
    from app.queue import enqueue_training

    validate_spec(session, spec)
    job = Job(
        name=spec.name or f"{spec.method} on dataset {spec.dataset_id}",
        spec=spec.model_dump(mode="json"),
        method=spec.method,
        base_model=spec.base_model,
        dataset_id=spec.dataset_id,
    )
    session.add(job)
    session.flush()
    assert job.id is not None
    add_event(session, job.id, "status", "queued")
    session.commit()
    try:
        job.task_id = enqueue_training(job.id)
    except Exception as exc:
        session.delete(job)
        for event in session.exec(select(JobEvent).where(JobEvent.job_id == job.id)).all():
            session.delete(event)
        session.commit()
        raise ServiceUnavailable(f"The job queue is not reachable ({type(exc).__name__}: {exc}); try again.") from exc
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def get_job(session: Session, job_id: int) -> Job:
    """One job, or NotFound."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} does not exist.")
    return job


def list_jobs(session: Session, offset: int = 0, limit: int = 100) -> tuple[list[Job], int]:
    """Jobs, newest first, and how many there are."""
    count = session.exec(select(func.count()).select_from(Job)).one()
    rows = session.exec(select(Job).order_by(col(Job.id).desc()).offset(offset).limit(limit)).all()
    return list(rows), count


def job_public(session: Session, job: Job) -> JobPublic:
    """The public shape of a job, with its adapter's id once it has one."""
    adapter_id = session.exec(select(Adapter.id).where(Adapter.job_id == job.id)).first()
    return JobPublic.model_validate(job, update={"adapter_id": adapter_id})


def cancel_job(session: Session, job_id: int) -> Job:
    """Cancel a queued job at once, or ask a running one to stop (it does within a few seconds)."""
    job = get_job(session, job_id)
    if job.status.is_terminal:
        raise JobStateError(f"Job {job_id} is already {job.status}; only queued or running jobs can be cancelled.")
    job.cancel_requested = True
    if job.status == JobStatus.queued:
        job.status = JobStatus.cancelled
        job.finished_at = utcnow()
        add_event(session, job_id, "status", "cancelled before it started")
    else:
        add_event(session, job_id, "cancel", "cancel requested; the worker stops at the next step")
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def list_metrics(session: Session, job_id: int, after_id: int = 0, limit: int = 10_000) -> list[MetricPoint]:
    """Metric points of a job in logging order, after a given point id."""
    get_job(session, job_id)
    statement = (
        select(MetricPoint)
        .where(MetricPoint.job_id == job_id, col(MetricPoint.id) > after_id)
        .order_by(col(MetricPoint.id))
        .limit(limit)
    )
    return list(session.exec(statement).all())


def list_events(session: Session, job_id: int) -> list[JobEvent]:
    """A job's event log, oldest first."""
    get_job(session, job_id)
    return list(session.exec(select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.id))).all())
