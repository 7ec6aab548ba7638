"""Database tables and their public shapes (SQLModel)."""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """The current time in UTC, as stored in every timestamp column."""
    return datetime.now(UTC)


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
    id: int | None = Field(default=None, primary_key=True)
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
    id: int | None = Field(default=None, primary_key=True)
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


class JobsPublic(SQLModel):
    data: list[JobPublic]
    count: int


class JobEvent(SQLModel, table=True):
    """Something that happened to a job: status changes, warnings, the traceback of a failure."""

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
    """One logged step of a job (train or eval); its id doubles as the SSE event id."""

    __table_args__ = (Index("ix_metricpoint_job_id_id", "job_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id")
    step: int
    epoch: float | None = None
    split: str = Field(max_length=10, description="train or eval")
    values: dict[str, float] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class MetricPointPublic(SQLModel):
    id: int
    step: int
    epoch: float | None
    split: str
    values: dict[str, float]


# ---- adapters ---------------------------------------------------------------------------------


class Adapter(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
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
