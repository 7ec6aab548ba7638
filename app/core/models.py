"""Database tables and their public shapes (SQLModel)."""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """The current time in UTC, as stored in every timestamp column."""
    return datetime.now(UTC)


# Ids that leave the database (URLs, SSE event ids, API answers) are never reused: SQLite's default hands a
# deleted highest id out again (a resumed job's replaced metric points did, and a stream continuing by id got
# the old run's values); AUTOINCREMENT keeps a high-water mark. Postgres sequences never reuse. Migration
# 0009_owners_and_ids rebuilds the existing SQLite tables with it.
AUTOINCREMENT = {"sqlite_autoincrement": True}


class JobStatus(StrEnum):
    """Where a job is in its life."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the job will not change status again by itself."""
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


# ---- datasets ---------------------------------------------------------------------------------


class DatasetBase(SQLModel):
    name: str = Field(max_length=200, description="Display name, by default the uploaded file's name.")


class Dataset(DatasetBase, table=True):
    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = Field(default=None, index=True, description="The user who uploaded it.")
    filename: str = Field(max_length=255, description="The file name as uploaded.")
    format: str = Field(max_length=10, description="csv, tsv, json or jsonl.")
    storage_key: str = Field(max_length=255, description="Generated name of the file in the artifact store.")
    size_bytes: int
    sha256: str = Field(max_length=64, index=True)
    row_count: int
    columns: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    profile: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class DatasetPublic(DatasetBase):
    id: int
    filename: str
    format: str
    size_bytes: int
    sha256: str
    row_count: int
    columns: list[str]
    profile: dict[str, Any]
    created_at: datetime


class DatasetsPublic(SQLModel):
    data: list[DatasetPublic]
    count: int


# ---- jobs -------------------------------------------------------------------------------------


class Job(SQLModel, table=True):
    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = Field(default=None, index=True, description="The user who launched it.")
    name: str = Field(max_length=200)
    status: JobStatus = Field(default=JobStatus.queued, index=True)
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    method: str = Field(max_length=40)
    base_model: str = Field(max_length=500)
    dataset_id: int | None = Field(default=None, foreign_key="dataset.id", index=True)
    error: str | None = None
    progress: float = 0.0
    current_step: int = 0
    total_steps: int | None = None
    eta_seconds: float | None = None
    cancel_requested: bool = False
    worker: str | None = Field(default=None, max_length=255)
    task_id: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    sweep_id: int | None = Field(default=None, index=True, description="The sweep that queued this job.")
    evaluation: dict[str, Any] | None = Field(
        default=None,
        sa_column=Column(JSON, nullable=True),
        description="The latest structured evaluation result, e.g. the classification confusion matrix.",
    )
    attempt: int = Field(default=0, description="How many times a worker has started the job.")
    run_token: str | None = Field(
        default=None, max_length=64, description="Token of the one queue delivery allowed to run the job."
    )


class JobPublic(SQLModel):
    id: int
    name: str
    status: JobStatus
    spec: dict[str, Any]
    method: str
    base_model: str
    dataset_id: int | None
    error: str | None
    progress: float
    current_step: int
    total_steps: int | None
    eta_seconds: float | None
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    adapter_id: int | None = None
    sweep_id: int | None = None
    attempt: int = 0
    waiting_reason: str | None = Field(
        default=None,
        description="Queued jobs only: why no connected worker can take it, e.g. no worker with a GPU is connected.",
    )
    queue_position: int | None = Field(
        default=None,
        description="Queued jobs only: 1 when it is next in its queue, 2 when one job waits before it, ...",
    )


class JobsPublic(SQLModel):
    data: list[JobPublic]
    count: int


class JobEvent(SQLModel, table=True):
    """Something that happened to a job: status changes, warnings, the traceback of a failure."""

    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    kind: str = Field(max_length=40)
    message: str
    created_at: datetime = Field(default_factory=utcnow)


class JobEventPublic(SQLModel):
    id: int
    kind: str
    message: str
    created_at: datetime


class MetricPoint(SQLModel, table=True):
    """One logged step of a job (train or eval); its id doubles as the SSE event id (never reused)."""

    __table_args__ = (
        Index("ix_metricpoint_job_id_id", "job_id", "id"),
        Index("ix_metricpoint_job_id_step", "job_id", "step"),
        AUTOINCREMENT,
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id")
    step: int
    epoch: float | None = None
    split: str = Field(max_length=10, description="train or eval")
    values: dict[str, float] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    attempt: int = Field(
        default=0,
        description="The job's attempt (start) that logged it; 0: logged before attempts were kept.",
    )


class MetricRollup(SQLModel, table=True):
    """A block of ``size`` consecutive metric points of a job, summarised per series as it was written
    (app/core/rollups.py): charts of long runs read these instead of every point."""

    __table_args__ = (Index("ix_metricrollup_job_id_size_last_id", "job_id", "size", "last_id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id")
    size: int = Field(description="Points per block: 16, 64 or 256.")
    prev_id: int | None = Field(
        default=None, description="The job's point before the block, as its writer saw it."
    )
    first_id: int
    last_id: int
    points: int
    series: str = Field(
        sa_column=Column(Text, nullable=False),
        description="JSON: per series key, [count, step, value, ...] (every point, or first/min/max/last).",
    )


class MetricPointPublic(SQLModel):
    id: int
    step: int
    epoch: float | None
    split: str
    values: dict[str, float]
    attempt: int = 0


# ---- adapters ---------------------------------------------------------------------------------


class Adapter(SQLModel, table=True):
    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = Field(default=None, index=True, description="The owner of the job that made it.")
    job_id: int = Field(foreign_key="job.id", index=True, unique=True)
    name: str = Field(max_length=200)
    method: str = Field(max_length=40)
    task: str = Field(max_length=40)
    base_model: str = Field(max_length=500)
    storage_key: str = Field(max_length=255, description="Folder of the adapter in the artifact store.")
    size_bytes: int
    files: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    trainable_params: int
    total_params: int
    labels: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    metrics: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class AdapterPublic(SQLModel):
    id: int
    job_id: int
    name: str
    method: str
    task: str
    base_model: str
    size_bytes: int
    files: list[str]
    trainable_params: int
    total_params: int
    trainable_percent: float
    labels: list[str]
    metrics: dict[str, float]
    created_at: datetime


class AdaptersPublic(SQLModel):
    data: list[AdapterPublic]
    count: int


# ---- resilience -------------------------------------------------------------------------------


class Checkpoint(SQLModel, table=True):
    """A saved training state of a job (kept in the artifact store), with the metrics at its step."""

    __table_args__ = (Index("ix_checkpoint_job_id_step", "job_id", "step", unique=True), AUTOINCREMENT)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id")
    step: int
    epoch: float | None = None
    storage_key: str = Field(max_length=255, description="Folder of the checkpoint in the artifact store.")
    metrics: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class CheckpointPublic(SQLModel):
    id: int
    job_id: int
    step: int
    epoch: float | None
    metrics: dict[str, float]
    created_at: datetime


# ---- accounts ---------------------------------------------------------------------------------


class User(SQLModel, table=True):
    """A person (or service) who signs in; the admin sees everything, others only what they own."""

    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(max_length=100, unique=True, index=True)
    password_hash: str | None = Field(default=None, max_length=255, description="argon2id; none until set.")
    is_admin: bool = False
    is_active: bool = True
    max_concurrent_jobs: int | None = Field(
        default=None, description="Queued + running jobs allowed at once."
    )
    created_at: datetime = Field(default_factory=utcnow)


class UserPublic(SQLModel):
    id: int
    username: str
    is_admin: bool
    is_active: bool
    max_concurrent_jobs: int | None
    has_password: bool = False
    created_at: datetime


class UsersPublic(SQLModel):
    data: list[UserPublic]
    count: int


class ApiToken(SQLModel, table=True):
    """An API token: only its sha256 is stored; the prefix lets a person recognise it in the list."""

    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(index=True)
    name: str = Field(max_length=100)
    prefix: str = Field(max_length=16)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class ApiTokenPublic(SQLModel):
    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class ApiTokensPublic(SQLModel):
    data: list[ApiTokenPublic]
    count: int


class LoginToken(SQLModel, table=True):
    """A one-time sign-in link (first start, invitations); only its sha256 is stored."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(index=True)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    purpose: str = Field(default="login", max_length=20, description="login or invite.")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    used_at: datetime | None = None


class BrowserSession(SQLModel, table=True):
    """A signed-in browser: the cookie holds a random token, the table its sha256 (logout deletes the row)."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(index=True)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime


class AuditEvent(SQLModel, table=True):
    """Who did what to which object: created, cancelled, downloaded, deleted, signed in, revoked."""

    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    user_id: int | None = Field(default=None, index=True)
    username: str = Field(default="", max_length=100)
    action: str = Field(max_length=40, index=True)
    object_type: str = Field(max_length=40)
    object_id: int | None = None
    detail: str = ""
    created_at: datetime = Field(default_factory=utcnow, index=True)


class AuditEventPublic(SQLModel):
    id: int
    user_id: int | None
    username: str
    action: str
    object_type: str
    object_id: int | None
    detail: str
    created_at: datetime


class AuditEventsPublic(SQLModel):
    data: list[AuditEventPublic]
    count: int


class SignInFailure(SQLModel, table=True):
    """One failed sign-in, counted per account and per client address to throttle password guessing."""

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, index=True, description="'account:<name>' or 'address:<ip>'.")
    failed_at: datetime = Field(default_factory=utcnow, index=True)


# ---- sweeps -----------------------------------------------------------------------------------


class Sweep(SQLModel, table=True):
    """A grid of jobs queued together: a base spec and lists of values for some of its fields."""

    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = Field(default=None, index=True, description="The user who started it.")
    name: str = Field(max_length=200)
    base_spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    grid: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


# ---- automation: webhooks and the OpenAI-compatible API ----------------------------------------


class Webhook(SQLModel, table=True):
    """A URL that receives a signed JSON event when one of its owner's jobs succeeds, fails or is cancelled."""

    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = Field(default=None, index=True, description="The user whose jobs it reports.")
    url: str = Field(max_length=2000)
    secret: str = Field(max_length=200, description="Key of the HMAC-SHA256 signature of every delivery.")
    description: str = Field(default="", max_length=200)
    events: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class WebhookDelivery(SQLModel, table=True):
    """One event for one webhook, and every attempt to deliver it (the outbox the dispatcher sends from)."""

    __table_args__ = (
        Index("ix_webhookdelivery_event", "webhook_id", "job_id", "event_type", unique=True),
        Index("ix_webhookdelivery_due", "status", "next_attempt_at"),
        AUTOINCREMENT,
    )

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: int = Field(index=True)
    owner_id: int | None = Field(default=None, index=True)
    job_id: int | None = Field(default=None, description="The job the event is about (none for a ping).")
    event_id: str = Field(max_length=64, description="Stable across retries, so a receiver can deduplicate.")
    event_type: str = Field(max_length=40)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(
        default="pending", max_length=20, description="pending, sending, delivered or failed."
    )
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default_factory=utcnow)
    locked_until: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    attempt_log: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    delivered_at: datetime | None = None


class FineTuningJobLink(SQLModel, table=True):
    """What a job created through the OpenAI-compatible API was asked with, beyond its spec."""

    job_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    owner_id: int | None = Field(default=None, index=True)
    model: str = Field(max_length=500, description="The model as the client named it.")
    suffix: str | None = Field(default=None, max_length=64)
    user_metadata: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    hyperparameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


# ---- workers (scale out) ----------------------------------------------------------------------


class Worker(SQLModel, table=True):
    """A training worker as it announced itself: its hardware, its queues, what it runs, when it was last seen."""

    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255, unique=True, description="The Celery worker name, e.g. gpu1@host.")
    hostname: str = Field(max_length=255)
    pid: int | None = None
    queues: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    cpu_count: int = 0
    memory_bytes: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    gpu_count: int = 0
    gpus: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False), description="[{name, memory_bytes}]"
    )
    status: str = Field(default="online", max_length=20, description="online or offline.")
    current_job_id: int | None = Field(default=None, index=True)
    jobs_run: int = 0
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)


class WorkerPublic(SQLModel):
    id: int
    name: str
    hostname: str
    pid: int | None
    queues: list[str]
    cpu_count: int
    memory_bytes: int | None
    gpu_count: int
    gpus: list[dict[str, Any]]
    status: str
    alive: bool = Field(description="Heard from within three heartbeats and not shut down.")
    busy: bool = Field(default=False, description="Running a job (whose id only its owner and admins see).")
    current_job_id: int | None = Field(description="The job it runs; empty for another user's job.")
    jobs_run: int
    started_at: datetime
    heartbeat_at: datetime


class WorkersPublic(SQLModel):
    data: list[WorkerPublic]
    count: int


# ---- evaluations ------------------------------------------------------------------------------


class EvaluationStatus(StrEnum):
    """Where an evaluation is in its life (no cancel: it is short and bounded by the file's size)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"

    @property
    def is_terminal(self) -> bool:
        """True once the evaluation will not change status again."""
        return self in (EvaluationStatus.succeeded, EvaluationStatus.failed)


class Evaluation(SQLModel, table=True):
    """An adapter run over a dataset file on a worker: metrics when the file has labels, predictions always.

    No foreign keys to the adapter or dataset: deleting either keeps the evaluation's results readable.
    """

    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = Field(default=None, index=True, description="The adapter's owner.")
    adapter_id: int = Field(index=True)
    dataset_id: int = Field(index=True)
    task: str = Field(max_length=40, description="The adapter's task: sequence-classification or causal-lm.")
    status: EvaluationStatus = Field(default=EvaluationStatus.queued, index=True)
    settings: dict[str, Any] = Field(
        default_factory=dict,
        sa_column=Column(JSON, nullable=False),
        description="The columns read (text_column, label_column or the causal-LM format) and sample limits.",
    )
    metrics: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    details: dict[str, Any] = Field(
        default_factory=dict,
        sa_column=Column(JSON, nullable=False),
        description="Per-class scores and confusion matrix, or generated samples.",
    )
    row_count: int | None = None
    predictions_key: str | None = Field(default=None, max_length=255, description="The CSV in the store.")
    error: str | None = None
    worker: str | None = Field(default=None, max_length=255)
    task_id: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class EvaluationPublic(SQLModel):
    id: int
    adapter_id: int
    dataset_id: int
    task: str
    status: EvaluationStatus
    settings: dict[str, Any]
    metrics: dict[str, float]
    details: dict[str, Any]
    row_count: int | None
    has_predictions: bool = False
    error: str | None
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationsPublic(SQLModel):
    data: list[EvaluationPublic]
    count: int


class ModelDownload(SQLModel, table=True):
    """A Hub model fetched into the shared Hub cache by a worker, with its live progress.

    ``status``: queued, running, succeeded, failed or cancelled. The worker writes the progress columns about
    twice a second; the web streams them (``/api/v1/model-downloads/{id}/stream``)."""

    __tablename__ = "model_download"
    __table_args__ = AUTOINCREMENT

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = Field(default=None, index=True, description="Who asked (their Hub token is used).")
    model_id: str = Field(max_length=200, index=True, description="The Hub id, owner/name.")
    revision: str = Field(default="main", max_length=200, description="Branch, tag or commit asked for.")
    commit_hash: str | None = Field(default=None, max_length=64, description="The commit fetched.")
    status: str = Field(default="queued", max_length=20, index=True)
    total_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    done_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    total_files: int = 0
    done_files: int = 0
    bytes_per_second: float = 0.0
    eta_seconds: float | None = None
    files: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    cancel_requested: bool = False
    error: str | None = None
    worker: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class HubToken(SQLModel, table=True):
    """A user's Hugging Face token for gated models, encrypted with the secret key (never shown again)."""

    __tablename__ = "hub_token"

    user_id: int = Field(primary_key=True)
    encrypted: str = Field(description="Fernet token of the Hub token, keyed by the studio's secret key.")
    created_at: datetime = Field(default_factory=utcnow)
