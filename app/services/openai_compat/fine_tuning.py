"""OpenAI fine-tuning jobs: a request becomes a native causal-LM job (``method.type`` supervised) or a preference job
with the DPO loss (``method.type`` dpo, OpenAI's preference file); ``ftjob-<n>`` is job ``n``.

What OpenAI's request carries beyond our spec (the model as named, suffix, metadata, the hyperparameters as
asked) is kept in ``finetuningjoblink``. Our method and its settings come from the ``peft`` extension field or
from metadata keys ``peft.method`` / ``peft.config`` (JSON text).
"""

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session, col, select

from app.core import autoconfig, models
from app.core.errors import InvalidSpec, NotFound
from app.core.models import Adapter, FineTuningJobLink, Job, JobStatus
from app.core.spec import JobSpec, TrainingSettings
from app.core.tasks import CAUSAL_LM, PREFERENCE
from app.services import jobs as jobs_service
from app.services.openai_compat.common import FILE_PREFIX, FT_NAME, JOB_PREFIX, ORGANIZATION, id_number, unix
from app.services.openai_compat.errors import openai_param
from app.services.openai_compat.files import OPENAI_PREFERENCE, data_format, get_file

# learning_rate_multiplier 1.0 is the rate the studio's auto rule picks for the job (app/core/autoconfig.py); this
# is only the reference for jobs created before that rule, whose hyperparameters were not recorded.
BASE_LEARNING_RATE = 5e-4
_SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | float | None = Field(
        default="auto",
        description="DPO's beta: how far the model may move from the reference; auto is 0.1.",
    )


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="allow")

    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(
        default="supervised",
        description="supervised (instruction tuning) or dpo (preference tuning on OpenAI's preference file).",
    )
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


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
    preference: dict[str, Any] = Field(
        default_factory=dict,
        description="Preference settings of a dpo job (loss ipo, label_smoothing, template, system_prompt, ...).",
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
    if method.type == "dpo":
        from_dpo = method.dpo.hyperparameters if method.dpo else None
        return from_dpo or DpoHyperparameters()
    if method.type != "supervised":
        raise InvalidSpec(
            f"method.type {method.type!r} is not supported; the studio fine-tunes with 'supervised' or 'dpo'.",
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
    if FT_NAME.search(body.model):
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
    dpo = (body.method or Method()).type == "dpo"
    if dpo != (fmt == "pairs"):
        raise InvalidSpec(
            f"File {body.training_file} is a {'preference (pairs)' if fmt == 'pairs' else fmt} file, but method.type "
            f"is {(body.method or Method()).type!r}: dpo trains on preference files (input, preferred_output, "
            "non_preferred_output), supervised on messages or prompt/completion files.",
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
    task_fields: dict[str, Any] = {"task": CAUSAL_LM, "causal_lm": {"format": fmt, **peft.causal_lm}}
    if dpo:
        beta = getattr(hyper, "beta", None)
        task_fields = {
            "task": PREFERENCE,
            PREFERENCE: {
                **OPENAI_PREFERENCE,
                "loss": "dpo",
                **({"beta": beta} if isinstance(beta, int | float) else {}),
                **peft.preference,
            },
        }
    fields: dict[str, Any] = {
        "name": peft.name or (f"{body.suffix} ({body.model})" if body.suffix else None),
        "base_model": body.model,
        "dataset_id": train.id,
        "validation_dataset_id": validation.id if validation else None,
        "validation_fraction": peft.validation_fraction
        if validation is None and peft.validation_fraction
        else 0.0,
        "method": peft.method or "lora",
        "method_config": peft.config,
        "training": training,
        **task_fields,
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
        base_rate = autoconfig.auto_learning_rate(inputs)
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
    reported: dict[str, Any] = {
        "n_epochs": resolved.num_epochs if spec.training.max_steps is None else "auto",
        "batch_size": spec.training.batch_size,
        "learning_rate_multiplier": float(resolved.learning_rate) / base_rate,
    }
    if dpo:
        reported["beta"] = spec.preference.resolved_beta()
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
    number = id_number(JOB_PREFIX, job_id, "fine_tuning_job_id", "fine-tuning job")
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
        statement = statement.where(col(Job.id) < id_number(JOB_PREFIX, after, "after", "fine-tuning job"))
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
        "method": {"type": "dpo", "dpo": {"hyperparameters": hyper}}
        if spec.get("task") == PREFERENCE
        else {"type": "supervised", "supervised": {"hyperparameters": hyper}},
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
