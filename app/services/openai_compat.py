"""The OpenAI-compatible API mapped onto the studio's own objects.

- A **file** (``file-<n>``) is dataset ``n``. ``POST /v1/files`` (purpose ``fine-tune``) takes JSONL in OpenAI's
  chat form (``{"messages": [...]}``) or prompt/completion form and stores it through the normal dataset
  upload (validation, profile, artifact store); every dataset can be used as a file.
- A **fine-tuning job** (``ftjob-<n>``) is job ``n``: a ``causal-lm`` job whose data format follows from the
  file's columns. What OpenAI's request carries beyond our spec (the model as named, suffix, metadata, the
  hyperparameters as asked) is kept in ``finetuningjoblink``. Our method and its settings come from the
  ``peft`` extension field (``extra_body={"peft": {...}}`` with the official client) or from metadata keys
  ``peft.method`` / ``peft.config`` (JSON text).
- A **fine-tuned model** is a finished job's adapter, named ``ft:<base>:<suffix>:ftjob-<n>`` (``<base>`` is the
  model as named, or a local folder's own name; without a suffix ``ft:<base>:ftjob-<n>``). Requests find the
  adapter by the trailing job id.
"""

import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session, col, select

from app.core import autoconfig, models
from app.core.datasets_io import detect_format, parse_rows
from app.core.errors import InvalidDataset, InvalidSpec, NotFound, PayloadTooLarge
from app.core.formats import example_from_row
from app.core.models import Adapter, Dataset, FineTuningJobLink, Job, JobEvent, JobStatus, MetricPoint
from app.core.settings import get_settings
from app.core.spec import CausalLMSettings, JobSpec, TrainingSettings
from app.services import datasets as datasets_service
from app.services import jobs as jobs_service

FILE_PREFIX = "file-"
JOB_PREFIX = "ftjob-"
ORGANIZATION = "peft-studio"
# learning_rate_multiplier 1.0 is the rate the studio's auto rule picks for the job (app/core/autoconfig.py); this
# is only the reference for jobs created before that rule, whose hyperparameters were not recorded.
BASE_LEARNING_RATE = 5e-4
_SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FT_NAME = re.compile(r"(?:^|:)ftjob-(\d+)$")


def unix(moment: datetime | None) -> int | None:
    """A timestamp as OpenAI writes it: whole seconds since the epoch."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _number(prefix: str, value: str, field: str, what: str) -> int:
    if value.startswith(prefix) and value[len(prefix) :].isascii() and value[len(prefix) :].isdigit():
        return int(value[len(prefix) :])
    raise NotFound(f"No such {what}: {value!r} (ids look like {prefix}1).", field=field)


# ---- files ------------------------------------------------------------------------------------


def data_format(columns: list[str]) -> str | None:
    """The causal-LM format a file's columns hold: chat, prompt-completion, alpaca, text, or None."""
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    return None


def file_object(dataset: Dataset) -> dict[str, Any]:
    """A dataset as an OpenAI file object."""
    return {
        "id": f"{FILE_PREFIX}{dataset.id}",
        "object": "file",
        "bytes": dataset.size_bytes,
        "created_at": unix(dataset.created_at),
        "filename": dataset.filename,
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _check_fine_tune_rows(columns: list[str], rows: list[dict[str, Any]], filename: str) -> None:
    fmt = data_format(columns)
    if fmt not in ("chat", "prompt-completion"):
        raise InvalidDataset(
            f"{filename!r} holds columns {', '.join(map(repr, columns[:10]))}; a fine-tune file needs one JSON "
            'object per line, either {"messages": [{"role": ..., "content": ...}, ...]} or '
            '{"prompt": ..., "completion": ...}.',
            field="file",
        )
    settings = CausalLMSettings(format=fmt)  # type: ignore[arg-type]
    for number, row in enumerate(rows, start=1):
        example_from_row(row, settings, "text", number)


def upload_file(
    session: Session, stream: BinaryIO, filename: str | None, purpose: str, owner_id: int | None = None
) -> Dataset:
    """Check a fine-tune JSONL file and store it as the owner's dataset (the same file again returns it again)."""
    if purpose != "fine-tune":
        raise InvalidSpec(
            f"purpose {purpose!r} is not supported; this server stores files for fine-tuning (purpose "
            "'fine-tune').",
            field="purpose",
        )
    if not filename:
        raise InvalidDataset("The upload has no file name; send a .jsonl file.", field="file")
    fmt = detect_format(filename)
    if fmt != "jsonl":
        raise InvalidDataset(
            f"{filename!r} is not a .jsonl file; fine-tune files are JSONL (one JSON object per line).",
            field="file",
        )
    limit = get_settings().max_upload_bytes
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(
            f"The file is larger than the upload limit of {limit:,} bytes (PEFT_STUDIO_MAX_UPLOAD_BYTES).",
            field="file",
        )
    columns, rows = parse_rows(data, fmt)
    _check_fine_tune_rows(columns, rows, filename)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    existing = session.exec(
        select(Dataset).where(Dataset.sha256 == digest, Dataset.owner_id == owner_id)
    ).first()
    if existing is not None:
        return existing
    return datasets_service.create_dataset(session, io.BytesIO(data), filename, owner_id=owner_id)


def get_file(session: Session, file_id: str, owner_id: int | None = None, field: str = "file_id") -> Dataset:
    """The dataset behind ``file-<n>`` (NotFound for another owner's)."""
    number = _number(FILE_PREFIX, file_id, field, "file")
    try:
        return datasets_service.get_dataset(session, number, owner_id)
    except NotFound:
        raise NotFound(f"No such file: {file_id!r}.", field=field) from None


def list_files(
    session: Session, after: str | None, limit: int, order: str = "desc", owner_id: int | None = None
) -> tuple[list[Dataset], bool]:
    """Files (datasets) after a cursor, newest first by default, and whether there are more."""
    statement = select(Dataset)
    if owner_id is not None:
        statement = statement.where(Dataset.owner_id == owner_id)
    if after:
        cursor = _number(FILE_PREFIX, after, "after", "file")
        statement = statement.where(col(Dataset.id) < cursor if order == "desc" else col(Dataset.id) > cursor)
    statement = statement.order_by(col(Dataset.id).desc() if order == "desc" else col(Dataset.id))
    rows = list(session.exec(statement.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


# ---- fine-tuning jobs -------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | int | None = Field(default="auto", description="Passes over the data.")
    batch_size: Literal["auto"] | int | None = Field(default="auto", description="Examples per step.")
    learning_rate_multiplier: Literal["auto"] | float | None = Field(
        default="auto",
        description="Times the learning rate the studio's auto rule picks for this method and model "
        "(docs/defaults.md).",
    )


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="allow")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(default="supervised", description="Only supervised is supported.")
    supervised: SupervisedMethod | None = None


class PeftOptions(BaseModel):
    """The extension field: our method and settings beyond what OpenAI's request can say."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(
        default=None, description="The PEFT method (GET /api/v1/methods); default lora."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="The method's own settings.")
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="Any training setting of the native spec (e.g. max_steps, max_length).",
    )
    causal_lm: dict[str, Any] = Field(
        default_factory=dict, description="Causal-LM data settings (template, system_prompt, packing, ...)."
    )
    validation_fraction: float | None = Field(
        default=None, description="Hold out this share when there is no validation_file (default 0)."
    )
    name: str | None = Field(default=None, max_length=200, description="The job's name in the studio.")


class FineTuningJobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs`` as OpenAI defines it, plus the ``peft`` extension."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1, max_length=500, description="The base model: a local folder or cached hub id."
    )
    training_file: str = Field(description="A file id (file-<n>).")
    validation_file: str | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Deprecated by OpenAI; use method."
    )
    integrations: list[dict[str, Any]] | None = None
    peft: PeftOptions | None = None


def _peft_from_metadata(metadata: dict[str, str]) -> PeftOptions | None:
    if "peft.method" not in metadata and "peft.config" not in metadata:
        return None
    config: Any = {}
    if "peft.config" in metadata:
        try:
            config = json.loads(metadata["peft.config"])
        except ValueError as exc:
            raise InvalidSpec(
                f"metadata['peft.config'] is not valid JSON ({exc}).", field="metadata"
            ) from None
        if not isinstance(config, dict):
            raise InvalidSpec("metadata['peft.config'] must be a JSON object.", field="metadata")
    return PeftOptions(method=metadata.get("peft.method"), config=config)


_PARAM_NAMES = {
    "base_model": "model",
    "dataset_id": "training_file",
    "validation_dataset_id": "validation_file",
    "training.num_epochs": "hyperparameters.n_epochs",
    "training.batch_size": "hyperparameters.batch_size",
    "training.learning_rate": "hyperparameters.learning_rate_multiplier",
    "training.seed": "seed",
    "method": "peft.method",
}


def openai_param(field: str | None) -> str | None:
    """The request parameter an error about a native spec field points at."""
    if field is None:
        return None
    if field in _PARAM_NAMES:
        return _PARAM_NAMES[field]
    if field.startswith("method_config"):
        return "peft.config" + field.removeprefix("method_config")
    if field.startswith(("training.", "causal_lm.")) or field == "validation_fraction":
        return f"peft.{field}"
    return field


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = metadata or {}
    if len(metadata) > 16:
        raise InvalidSpec("metadata holds at most 16 keys.", field="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise InvalidSpec(
                f"metadata key {key[:64]!r}: keys are at most 64 characters, values at most 512.",
                field="metadata",
            )
    return metadata


def _hyperparameters(body: FineTuningJobCreate) -> Hyperparameters:
    method = body.method or Method()
    if method.type != "supervised":
        raise InvalidSpec(
            f"method.type {method.type!r} is not supported; the studio fine-tunes with 'supervised'.",
            field="method.type",
        )
    from_method = method.supervised.hyperparameters if method.supervised else None
    return from_method or body.hyperparameters or Hyperparameters()


def build_spec(
    session: Session, body: FineTuningJobCreate, owner_id: int | None = None
) -> tuple[JobSpec, dict[str, Any]]:
    """The native job spec for an OpenAI request, and the hyperparameters to report back."""
    metadata = _check_metadata(body.metadata)
    if body.suffix is not None and not _SUFFIX.match(body.suffix):
        raise InvalidSpec("suffix must be 1 to 64 letters, digits, '-', '_' or '.'.", field="suffix")
    if body.integrations:
        raise InvalidSpec("integrations are not supported by this server.", field="integrations")
    if _FT_NAME.search(body.model):
        raise InvalidSpec(
            f"model {body.model!r} is a fine-tuned model; fine-tune a base model (continuing from an adapter "
            "is not supported).",
            field="model",
        )
    peft = body.peft or _peft_from_metadata(metadata) or PeftOptions()
    train = get_file(session, body.training_file, owner_id, "training_file")
    fmt = data_format(train.columns)
    if fmt is None:
        raise InvalidSpec(
            f"File {body.training_file} has columns {', '.join(map(repr, train.columns[:10]))}; a training file "
            "needs 'messages', or 'prompt' and 'completion'.",
            field="training_file",
        )
    validation = (
        get_file(session, body.validation_file, owner_id, "validation_file") if body.validation_file else None
    )
    if validation is not None and data_format(validation.columns) != fmt:
        raise InvalidSpec(
            f"validation_file {body.validation_file} is not in the same form as training_file ({fmt}).",
            field="validation_file",
        )
    hyper = _hyperparameters(body)
    training: dict[str, Any] = dict(peft.training)
    if isinstance(hyper.n_epochs, int):
        training["num_epochs"] = hyper.n_epochs
    if isinstance(hyper.batch_size, int):
        training["batch_size"] = hyper.batch_size
    multiplier = hyper.learning_rate_multiplier
    if body.seed is not None:
        training["seed"] = body.seed
    fields: dict[str, Any] = {
        "name": peft.name or (f"{body.suffix} ({body.model})" if body.suffix else None),
        "task": "causal-lm",
        "base_model": body.model,
        "dataset_id": train.id,
        "validation_dataset_id": validation.id if validation else None,
        "validation_fraction": peft.validation_fraction
        if validation is None and peft.validation_fraction
        else 0.0,
        "method": peft.method or "lora",
        "method_config": peft.config,
        "training": training,
        "causal_lm": {"format": fmt, **peft.causal_lm},
    }
    try:
        spec = JobSpec.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        raise InvalidSpec(f"{openai_param(field)}: {message}", field=openai_param(field)) from None
    # "auto" is the studio's own rule; a multiplier scales the rate that rule picks (of an explicit rate if the
    # peft extension gave one), as OpenAI's multiplies its own default.
    inputs = autoconfig.rule_inputs(session, spec)
    base_rate = spec.training.learning_rate
    if isinstance(base_rate, str):  # auto
        base_rate = autoconfig.learning_rate_for(
            inputs.method_learning_rate, inputs.model_params, inputs.adapter
        )
    if isinstance(multiplier, int | float):
        rate = float(f"{base_rate * multiplier:.6g}")
        try:
            spec = spec.model_copy(
                update={
                    "training": TrainingSettings.model_validate(
                        {**spec.training.model_dump(), "learning_rate": rate}
                    )
                }
            )
        except ValidationError as exc:
            message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            param = "hyperparameters.learning_rate_multiplier"
            raise InvalidSpec(f"{param}: {multiplier} × {base_rate:g} {message}", field=param) from None
    resolved = autoconfig.resolve_training(spec.training, inputs).training
    reported = {
        "n_epochs": resolved.num_epochs if spec.training.max_steps is None else "auto",
        "batch_size": spec.training.batch_size,
        "learning_rate_multiplier": float(resolved.learning_rate) / base_rate,
    }
    return spec, reported


def create_job(session: Session, body: FineTuningJobCreate, owner_id: int | None = None) -> Job:
    """Validate an OpenAI fine-tuning request, queue it as the owner's causal-LM job, remember how it was asked."""
    spec, reported = build_spec(session, body, owner_id)
    try:
        job = jobs_service.create_job(session, spec, owner_id)
    except InvalidSpec as exc:
        raise InvalidSpec(exc.message, field=openai_param(exc.field), row=exc.row) from None
    assert job.id is not None
    session.add(
        FineTuningJobLink(
            job_id=job.id,
            owner_id=job.owner_id,
            model=body.model,
            suffix=body.suffix,
            user_metadata=_check_metadata(body.metadata),
            hyperparameters=reported,
        )
    )
    session.commit()
    session.refresh(job)
    return job


def get_job(session: Session, job_id: str, owner_id: int | None = None) -> Job:
    """The job behind ``ftjob-<n>`` (NotFound for another owner's)."""
    number = _number(JOB_PREFIX, job_id, "fine_tuning_job_id", "fine-tuning job")
    try:
        return jobs_service.get_job(session, number, owner_id)
    except NotFound:
        raise NotFound(f"No such fine-tuning job: {job_id!r}.", field="fine_tuning_job_id") from None


def list_jobs(
    session: Session, after: str | None, limit: int, owner_id: int | None = None
) -> tuple[list[Job], bool]:
    """Jobs newest first after a cursor (a job id), and whether there are more."""
    statement = select(Job)
    if owner_id is not None:
        statement = statement.where(Job.owner_id == owner_id)
    if after:
        statement = statement.where(col(Job.id) < _number(JOB_PREFIX, after, "after", "fine-tuning job"))
    rows = list(session.exec(statement.order_by(col(Job.id).desc()).limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


def _display_base(model: str) -> str:
    return Path(model).name if model.startswith(("/", ".", "~")) else model


def fine_tuned_model_name(session: Session, job: Job) -> str:
    """``ft:<base>:<suffix>:ftjob-<n>`` (``ft:<base>:ftjob-<n>`` without a suffix)."""
    link = session.get(FineTuningJobLink, job.id)
    base = _display_base(link.model if link else job.base_model)
    suffix = link.suffix if link else None
    return ":".join(["ft", base, *([suffix] if suffix else []), f"{JOB_PREFIX}{job.id}"])


def _reported_hyperparameters(job: Job, link: FineTuningJobLink | None) -> dict[str, Any]:
    if link is not None and link.hyperparameters:
        return dict(link.hyperparameters)
    training = job.spec.get("training", {})
    rate = training.get("learning_rate", BASE_LEARNING_RATE)
    return {
        "n_epochs": training.get("num_epochs") if not training.get("max_steps") else "auto",
        "batch_size": training.get("batch_size", "auto"),
        "learning_rate_multiplier": rate / BASE_LEARNING_RATE,
    }


def job_object(session: Session, job: Job) -> dict[str, Any]:
    """A job as an OpenAI fine-tuning job object (with a ``peft`` field of studio details)."""
    link = session.get(FineTuningJobLink, job.id)
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).first()
    hyper = _reported_hyperparameters(job, link)
    spec = job.spec
    estimated = None
    if job.status == JobStatus.running and job.eta_seconds is not None:
        estimated = unix(models.utcnow() + timedelta(seconds=job.eta_seconds))
    error = None
    if job.status == JobStatus.failed:
        error = {"code": "job_failed", "message": job.error or "the job failed", "param": None}
    return {
        "object": "fine_tuning.job",
        "id": f"{JOB_PREFIX}{job.id}",
        "model": link.model if link else job.base_model,
        "created_at": unix(job.created_at),
        "finished_at": unix(job.finished_at) if job.status.is_terminal else None,
        "fine_tuned_model": fine_tuned_model_name(session, job) if adapter is not None else None,
        "organization_id": ORGANIZATION,
        "result_files": [],
        "status": job.status.value,
        "validation_file": f"{FILE_PREFIX}{spec['validation_dataset_id']}"
        if spec.get("validation_dataset_id")
        else None,
        "training_file": f"{FILE_PREFIX}{spec.get('dataset_id')}",
        "hyperparameters": hyper,
        "trained_tokens": None,
        "error": error,
        "user_provided_suffix": link.suffix if link else None,
        "seed": spec.get("training", {}).get("seed", 42),
        "estimated_finish": estimated,
        "integrations": [],
        "metadata": (link.user_metadata or None) if link else None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "peft": {
            "job_id": job.id,
            "task": spec.get("task"),
            "method": job.method,
            "method_config": spec.get("method_config", {}),
            "progress": job.progress,
            "current_step": job.current_step,
            "total_steps": job.total_steps,
            "adapter_id": adapter.id if adapter else None,
        },
    }


def cancel_job(session: Session, job_id: str, owner_id: int | None = None) -> Job:
    """Cancel a queued or running job."""
    job = get_job(session, job_id, owner_id)
    assert job.id is not None
    return jobs_service.cancel_job(session, job.id, owner_id)


_LEVELS = {"error": "error", "traceback": "error", "warning": "warn", "cancel": "warn"}


def _event_items(session: Session, job: Job) -> list[tuple[datetime, str, dict[str, Any]]]:
    items: list[tuple[datetime, str, dict[str, Any]]] = []
    for event in session.exec(select(JobEvent).where(JobEvent.job_id == job.id).order_by(col(JobEvent.id))):
        event_id = f"ftevent-e{event.id}"
        items.append(
            (
                event.created_at,
                event_id,
                {
                    "object": "fine_tuning.job.event",
                    "id": event_id,
                    "created_at": unix(event.created_at),
                    "level": _LEVELS.get(event.kind, "info"),
                    "message": event.message,
                    "data": {"kind": event.kind},
                    "type": "message",
                },
            )
        )
    points = session.exec(
        select(MetricPoint).where(MetricPoint.job_id == job.id).order_by(col(MetricPoint.id))
    )
    for point in points:
        event_id = f"ftevent-m{point.id}"
        loss = point.values.get("loss")
        is_eval = point.split == "eval"
        data: dict[str, Any] = {
            "step": point.step,
            "total_steps": job.total_steps,
            "epoch": point.epoch,
            "train_loss": None if is_eval else loss,
            "valid_loss": loss if is_eval else None,
            **{
                f"{'valid' if is_eval else 'train'}_{key}": value
                for key, value in point.values.items()
                if key != "loss"
            },
        }
        total = f"/{job.total_steps}" if job.total_steps else ""
        shown = f"{loss:.4f}" if isinstance(loss, int | float) else "n/a"
        message = f"Step {point.step}{total}: {'validation' if is_eval else 'training'} loss={shown}"
        items.append(
            (
                point.created_at,
                event_id,
                {
                    "object": "fine_tuning.job.event",
                    "id": event_id,
                    "created_at": unix(point.created_at),
                    "level": "info",
                    "message": message,
                    "data": data,
                    "type": "metrics",
                },
            )
        )
    return items


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise NotFound(f"No such item to page after: {after!r}.", field="after")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return page, start + limit < len(items)


def list_events(
    session: Session, job_id: str, after: str | None, limit: int, owner_id: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """A job's messages (status changes, errors) and metrics, newest first."""
    job = get_job(session, job_id, owner_id)
    items = _event_items(session, job)
    items.sort(key=lambda item: (item[0].replace(tzinfo=None), item[1]), reverse=True)
    return _page([item for _, _, item in items], after, limit)


def _checkpoint_metrics(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": step,
        "train_loss": metrics.get("train_loss", metrics.get("loss")),
        "valid_loss": metrics.get("eval_loss", metrics.get("valid_loss")),
        "train_mean_token_accuracy": metrics.get("token_accuracy"),
        "valid_mean_token_accuracy": metrics.get("eval_token_accuracy"),
        "full_valid_loss": None,
        "full_valid_mean_token_accuracy": None,
    }


def list_checkpoints(
    session: Session, job_id: str, after: str | None, limit: int, owner_id: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Saved checkpoints of a job (from the resilience table, where it exists) and the final adapter, newest first."""
    job = get_job(session, job_id, owner_id)
    ft_job_id = f"{JOB_PREFIX}{job.id}"
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).first()
    model_name = fine_tuned_model_name(session, job)
    items: list[dict[str, Any]] = []
    checkpoint_table = getattr(models, "Checkpoint", None)
    steps: set[int] = set()
    if checkpoint_table is not None:
        rows = session.exec(
            select(checkpoint_table)
            .where(checkpoint_table.job_id == job.id)
            .order_by(col(checkpoint_table.step))
        ).all()
        for row in rows:
            steps.add(int(row.step))
            items.append(
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"ftckpt-{row.id}",
                    "created_at": unix(row.created_at),
                    "fine_tuned_model_checkpoint": f"{model_name}:ckpt-step-{row.step}",
                    "fine_tuning_job_id": ft_job_id,
                    "metrics": _checkpoint_metrics(int(row.step), dict(row.metrics or {})),
                    "step_number": int(row.step),
                }
            )
    if adapter is not None and job.current_step not in steps:
        metrics = dict(adapter.metrics)
        items.append(
            {
                "object": "fine_tuning.job.checkpoint",
                "id": f"ftckpt-final-{job.id}",
                "created_at": unix(adapter.created_at),
                "fine_tuned_model_checkpoint": model_name,
                "fine_tuning_job_id": ft_job_id,
                "metrics": {
                    **_checkpoint_metrics(job.current_step, metrics),
                    "valid_loss": metrics.get("loss"),
                },
                "step_number": job.current_step,
            }
        )
    items.sort(key=lambda item: (item["step_number"], item["created_at"] or 0), reverse=True)
    return _page(items, after, limit)


# ---- models -----------------------------------------------------------------------------------


def list_models(session: Session, owner_id: int | None = None) -> list[dict[str, Any]]:
    """Base models (the catalog and every base an adapter was trained on) and fine-tuned models."""
    from app.core.base_models import catalog

    statement = select(Adapter).order_by(col(Adapter.id).desc())
    if owner_id is not None:
        statement = statement.where(Adapter.owner_id == owner_id)
    adapters = list(session.exec(statement).all())
    bases = list(dict.fromkeys([*catalog(), *(adapter.base_model for adapter in adapters)]))
    result = [
        {"id": base, "object": "model", "created": 0, "owned_by": ORGANIZATION, "peft": {"kind": "base"}}
        for base in bases
    ]
    for adapter in adapters:
        job = session.get(Job, adapter.job_id)
        if job is None:
            continue
        result.append(
            {
                "id": fine_tuned_model_name(session, job),
                "object": "model",
                "created": unix(adapter.created_at),
                "owned_by": f"user-{job.owner_id}" if job.owner_id is not None else ORGANIZATION,
                "peft": {
                    "kind": "adapter",
                    "adapter_id": adapter.id,
                    "task": adapter.task,
                    "method": adapter.method,
                    "base_model": adapter.base_model,
                    "labels": adapter.labels,
                },
            }
        )
    return result


def resolve_model(session: Session, name: str, owner_id: int | None = None) -> tuple[Adapter, bool]:
    """The adapter a model name means, and whether to use it (False: a base model, answered by the bare base
    behind one of its adapters)."""
    match = _FT_NAME.search(name)
    if match:
        job_id = int(match.group(1))
        adapter = session.exec(select(Adapter).where(Adapter.job_id == job_id)).first()
        if adapter is None or (owner_id is not None and adapter.owner_id != owner_id):
            raise NotFound(
                f"The model {name!r} does not exist or its job has not succeeded yet (GET /v1/models lists "
                "the models ready to use).",
                field="model",
            )
        return adapter, True
    if ":ckpt-step-" in name:
        raise InvalidSpec(
            f"{name!r} is an intermediate checkpoint; only finished fine-tuned models answer requests.",
            field="model",
        )
    statement = select(Adapter).where(Adapter.base_model == name, Adapter.task == "causal-lm")
    if owner_id is not None:
        statement = statement.where(Adapter.owner_id == owner_id)
    adapter = session.exec(statement.order_by(col(Adapter.id).desc())).first()
    if adapter is None:
        raise NotFound(
            f"The model {name!r} does not exist here: use a fine-tuned model from GET /v1/models (a base model "
            "answers only once one of its causal-LM adapters exists).",
            field="model",
        )
    return adapter, False
