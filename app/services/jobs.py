"""Jobs: validate a spec against the datasets and model, queue it, list, cancel, report progress."""

import difflib
from typing import Any

from sqlmodel import Session, col, func, select

from app.core.autoconfig import resolve_spec
from app.core.base_models import resolve_base_model
from app.core.datasets_io import MAX_LABEL_CLASSES
from app.core.errors import InvalidSpec, JobStateError, NotFound, ServiceUnavailable
from app.core.models import Adapter, Dataset, Job, JobEvent, JobPublic, JobStatus, MetricPoint, Worker, utcnow
from app.core.netguard import check_mlflow_uri
from app.core.spec import JobSpec
from app.services.datasets import check_validation_split, get_dataset
from app.services.run_tokens import new_run_token

# A label column may have at most this share of the rows as distinct classes (one class per two rows).
MAX_CLASS_SHARE = 0.5
_KIND_NAMES = {
    "string": "text",
    "number": "numbers",
    "bool": "true/false values",
    "object": "objects or arrays",
}


def _column_info(dataset: Dataset, column: str) -> dict[str, Any]:
    info = dataset.profile.get("columns", {}).get(column, {})
    return info if isinstance(info, dict) else {}


def _describe_kinds(info: dict[str, Any]) -> str:
    """E.g. "numbers (3 rows, first row 1) and text (2 rows, first row 4)" for a mixed column."""
    parts = [
        f"{_KIND_NAMES.get(kind, kind)} ({detail['count']} row(s), first row {detail['first_row']})"
        for kind, detail in sorted(info.get("kinds", {}).items(), key=lambda item: item[1]["first_row"])
    ]
    return " and ".join(parts) if parts else "values of different types"


def _rows_from(count: int, first: int | None) -> str:
    """E.g. "3 row(s), first in row 7"; profiles stored before rows were recorded give only the count."""
    return f"{count} row(s)" + (f", first in row {first}" if first else "")


def _missing_column(dataset: Dataset, field: str, column: str, which: str) -> InvalidSpec:
    suggestions = [name for name in dataset.columns if name.lower() == column.lower()]
    suggestions += difflib.get_close_matches(column, dataset.columns, n=1, cutoff=0.6)
    hint = f" Did you mean {suggestions[0]!r}?" if suggestions else ""
    role = field.removesuffix("_column")
    return InvalidSpec(
        f"The {role} column {column!r} ({field}) is not in {which}dataset {dataset.id}; its columns are "
        f"{', '.join(map(repr, dataset.columns))}.{hint}",
        field=field,
    )


def _check_text_column(dataset: Dataset, column: str, which: str) -> None:
    """The text column exists, holds text in every row, and is not just numbers."""
    if column not in dataset.columns:
        raise _missing_column(dataset, "text_column", column, which)
    info = _column_info(dataset, column)
    where = f"The text column {column!r} of {which}dataset {dataset.id}"
    kind = info.get("type")
    if kind == "mixed":
        raise InvalidSpec(
            f"{where} holds {_describe_kinds(info)}; every row needs text.", field="text_column"
        )
    if kind is not None and kind != "string":
        raise InvalidSpec(
            f"{where} holds {_KIND_NAMES.get(kind, kind)}, not text; choose the column with the input "
            "sentences.",
            field="text_column",
        )
    if info.get("missing"):
        raise InvalidSpec(
            f"{where} is empty in {_rows_from(info['missing'], info.get('first_missing_row'))}; "
            "every row needs text. Fill or remove those rows and upload the file again.",
            field="text_column",
        )
    if info.get("numeric") and info["numeric"] == dataset.row_count:
        example = next((row.get(column) for row in dataset.profile.get("preview", [])), None)
        shown = f" (row 1 is {example!r})" if example is not None else ""
        raise InvalidSpec(
            f"{where} holds only numbers{shown}, not text; choose the column with the input sentences.",
            field="text_column",
        )


def _label_names(info: dict[str, Any]) -> set[str]:
    counts = info.get("value_counts")
    if isinstance(counts, dict):
        return set(counts)
    return set(info.get("values") or ())


def _check_label_column(dataset: Dataset, spec: JobSpec, which: str) -> None:
    """The label column exists and every row has a label of one type (labels of mixed types are refused)."""
    column = spec.label_column
    if column not in dataset.columns:
        raise _missing_column(dataset, "label_column", column, which)
    info = _column_info(dataset, column)
    where = f"The label column {column!r} of {which}dataset {dataset.id}"
    if info.get("missing"):
        raise InvalidSpec(
            f"{where} is empty in {_rows_from(info['missing'], info.get('first_missing_row'))}; "
            "every row needs a label. Fill or remove those rows and upload the file again.",
            field="label_column",
        )
    kind = info.get("type")
    if kind == "mixed":
        # 1 and "1" would become one class, 1 and "pos" two classes of different types: ask for one type.
        raise InvalidSpec(
            f"{where} mixes {_describe_kinds(info)}; write every label the same way (all text, "
            'e.g. "pos"/"neg", or all numbers).',
            field="label_column",
        )
    if kind == "object":
        raise InvalidSpec(
            f"{where} holds objects or arrays; a label must be one text, number or true/false value.",
            field="label_column",
        )


def _check_classes(dataset: Dataset, spec: JobSpec) -> set[str]:
    """At least 2 classes, at most 100, each repeated: returns the label names."""
    info = _column_info(dataset, spec.label_column)
    classes = info.get("distinct", 0)
    where = f"The label column {spec.label_column!r} of dataset {dataset.id}"
    if classes < 2:
        only = f" (every row is {info['values'][0]!r})" if classes == 1 and info.get("values") else ""
        raise InvalidSpec(
            f"{where} has {classes} distinct value{'' if classes == 1 else 's'}{only}; classification needs "
            "at least 2 classes.",
            field="label_column",
        )
    if "value_counts" not in info:
        raise InvalidSpec(
            f"{where} has {classes} distinct values in {dataset.row_count} rows: it does not look like a "
            f"label column (2 to {MAX_LABEL_CLASSES} classes, each on several rows). Is it the text column?",
            field="label_column",
        )
    if dataset.row_count >= 10 and classes > MAX_CLASS_SHARE * dataset.row_count:
        # A classifier learns a class from several examples of it; one class per row or two is an id or a text.
        others = [
            name
            for name, other in dataset.profile.get("columns", {}).items()
            if name != spec.label_column
            and other.get("value_counts")
            and other.get("distinct", 0) <= MAX_CLASS_SHARE * dataset.row_count
        ]
        hint = f" Columns that look like labels: {', '.join(map(repr, others))}." if others else ""
        raise InvalidSpec(
            f"{where} has {classes} distinct values in {dataset.row_count} rows ({classes / dataset.row_count:.0%} "
            f"of the rows): too many classes for this much data, each class needs several examples (at most "
            f"{MAX_CLASS_SHARE:.0%} of the rows may be distinct classes). Choose the column that holds the "
            f"class.{hint}",
            field="label_column",
        )
    return _label_names(info)


def _get_dataset(
    session: Session, dataset_id: int, field: str, which: str, owner_id: int | None = None
) -> Dataset:
    try:
        return get_dataset(session, dataset_id, owner_id)
    except NotFound:
        raise InvalidSpec(
            f"The {which}dataset {dataset_id} ({field}) does not exist; upload it first or pick one from "
            "GET /api/v1/datasets.",
            field=field,
        ) from None


def _check_classification_data(dataset: Dataset, validation: Dataset | None, spec: JobSpec) -> None:
    """Text and label columns of the training (and validation) data fit a classification job."""
    if spec.text_column == spec.label_column:
        raise InvalidSpec(
            f"text_column and label_column are both {spec.label_column!r}; the label must be another column.",
            field="label_column",
        )
    text_columns = spec.text_columns or [spec.text_column]
    if spec.label_column in text_columns:
        raise InvalidSpec(
            f"text_columns include the label column {spec.label_column!r}; the label must not be in the input.",
            field="text_columns",
        )
    for column in text_columns:
        _check_text_column(dataset, column, "")
    _check_label_column(dataset, spec, "")
    labels = _check_classes(dataset, spec)
    if validation is None:
        return
    for column in text_columns:
        _check_text_column(validation, column, "validation ")
    _check_label_column(validation, spec, "validation ")
    unseen = sorted(_label_names(_column_info(validation, spec.label_column)) - labels)
    if unseen:
        raise InvalidSpec(
            f"Validation dataset {validation.id} has label(s) {', '.join(map(repr, unseen[:10]))} that never "
            f"occur in training dataset {dataset.id} (its labels: {', '.join(map(repr, sorted(labels)))}).",
            field="validation_dataset_id",
        )


def validate_spec(session: Session, spec: JobSpec, owner_id: int | None = None) -> None:
    """Check everything a spec refers to, so a queued job does not fail on its first step.

    Raises InvalidSpec naming the field (and the row, where a dataset is at fault) and what is expected.
    Checks run cheapest first and stop at the first problem; none of them loads a model or reads a dataset
    file (they use the profile stored at upload).
    """
    if spec.task == "causal-lm":  # its own columns and model checks (app/services/causal_lm.py)
        from app.services.causal_lm import validate_causal_lm_spec

        validate_causal_lm_spec(session, spec, owner_id)
        return
    dataset = _get_dataset(session, spec.dataset_id, "dataset_id", "", owner_id)
    validation = None
    if spec.validation_dataset_id is not None:
        validation = _get_dataset(
            session, spec.validation_dataset_id, "validation_dataset_id", "validation ", owner_id
        )
    if spec.task == "sequence-classification":
        _check_classification_data(dataset, validation, spec)
    if validation is None:
        check_validation_split(dataset, spec.validation_fraction)
    model = resolve_base_model(spec.base_model)
    if model.max_positions is not None and spec.training.max_length > model.max_positions:
        raise InvalidSpec(
            f"training.max_length {spec.training.max_length} is beyond what {spec.base_model!r} accepts; "
            f"use at most {model.max_positions} (its position embeddings).",
            field="training.max_length",
        )


def add_event(session: Session, job_id: int, kind: str, message: str) -> None:
    """Record something that happened to a job (committed by the caller)."""
    session.add(JobEvent(job_id=job_id, kind=kind, message=message))


def create_job(session: Session, spec: JobSpec, owner_id: int | None = None) -> Job:
    """Validate and queue a job; if the queue cannot take it, nothing is kept."""
    from app.core.queue import enqueue_training
    from app.http.auth import check_job_cap, scope_for

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
    earlier = session.exec(select(Job).where(col(Job.status) == JobStatus.queued, col(Job.id) < job.id)).all()
    return 1 + sum(1 for other in earlier if _queue_of(other.spec) == queue)


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
