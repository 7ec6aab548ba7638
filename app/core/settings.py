"""The one place that reads the environment: settings shared by the web app, the worker and the CLI."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL_ID = "bundled/all-MiniLM-L6-v2"


class Settings(BaseSettings):
    """PEFT Studio settings; every field is an environment variable prefixed with ``PEFT_STUDIO_``."""

    model_config = SettingsConfigDict(env_prefix="PEFT_STUDIO_", extra="ignore")

    data_dir: Path = Field(
        default=Path("data"),
        description="Folder for the embedded defaults: SQLite database, SQLite broker and artifacts.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the database; empty means a SQLite file in data_dir. "
        "Example: postgresql+psycopg://user@127.0.0.1:5432/studio.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL; empty means kombu's SQLAlchemy transport on a SQLite file in data_dir. "
        "Example: redis://127.0.0.1:6379/0.",
    )
    artifact_root: Path | None = Field(
        default=None,
        description="Folder where datasets, checkpoints and adapters are stored; empty means data_dir/artifacts.",
    )
    queue_name: str = Field(default="training", description="Celery queue that training jobs are sent to.")
    max_upload_bytes: int = Field(
        default=200 * 1024 * 1024, description="Largest dataset file accepted by an upload, in bytes."
    )
    max_rows: int = Field(default=2_000_000, description="Most rows a dataset may have.")
    stream_poll_seconds: float = Field(
        default=0.1,
        description="How often the live stream looks for new metric points in the database (with a Redis "
        "broker the stream is woken at once by pub/sub, and this is only the fallback).",
    )
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a web process remembers a valid token or session cookie (0: look it up on every "
        "request). A change to accounts (revoked token, sign-out, deactivated user) takes effect at once in "
        "every process sharing the data folder; web processes on other hosts see it within this time.",
    )
    cancel_poll_seconds: float = Field(
        default=0.5, description="How often a running job checks whether it has been cancelled."
    )
    inference_cache_size: int = Field(
        default=2, description="How many base models the try-out engine keeps warm in memory."
    )
    environment: str = Field(default="development", description="development or production.")
    secret_key: str = Field(
        default="change-me",
        description="Secret for signing sessions; the placeholder is refused outside development.",
    )
    torch_threads: int | None = Field(
        default=None, description="Threads torch may use in a worker; empty lets torch decide."
    )
    heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often a worker running a job reports that it is alive."
    )
    heartbeat_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A running job whose worker has not reported for this long is requeued (or failed).",
    )
    reaper_interval_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How often the web app looks for running jobs whose worker vanished (0: never).",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Times a job is started in all before a vanished worker makes it fail instead of requeue.",
    )
    admin_token: str | None = Field(
        default=None,
        description="An API token for the admin, registered (hashed) at start; also signs a browser in through "
        "/login/token. For scripts and tests; at least 20 characters.",
    )
    admin_username: str = Field(
        default="admin", description="Name of the admin account created on first start."
    )
    allow_signup: bool = Field(
        default=False, description="Let anyone create an account on /register (off: the admin creates users)."
    )
    session_days: float = Field(default=14.0, gt=0, description="How long a browser stays signed in.")
    login_link_minutes: float = Field(
        default=60.0 * 24, gt=0, description="How long a one-time login link (first start, invitation) works."
    )
    max_json_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="Largest JSON or form (urlencoded) request body, in bytes; multipart uploads have "
        "max_upload_bytes, and the sign-in forms a fixed 64 KiB.",
    )
    sign_in_max_failures: int = Field(
        default=5,
        ge=1,
        description="Failed sign-ins per account, and per client address, within sign_in_window_seconds before "
        "further attempts are refused with 429 until the window has passed.",
    )
    sign_in_window_seconds: float = Field(
        default=900.0, gt=0, description="The window (seconds) in which failed sign-ins are counted."
    )
    trust_remote_code_models: list[str] = Field(
        default_factory=list,
        description="Base models (ids or folders) allowed to run their own Python code (trust_remote_code), "
        'as a JSON list, e.g. ["org/model"]; every other model with custom code is refused.',
    )
    hub_downloads: bool = Field(
        default=False,
        description="Let workers download models from the Hugging Face Hub (HF_ENDPOINT) into the Hub cache; "
        "off, the studio uses only what is already cached and never reaches the network.",
    )
    hub_allow_pickle: bool = Field(
        default=False,
        description="Also download pickle weights (*.bin, *.pt) from the Hub; off, only safetensors are "
        "fetched and a model with only pickle weights is refused.",
    )
    model_folders: list[Path] = Field(
        default_factory=list,
        description="Folders whose model subfolders may be used as base models by path, as a JSON list, e.g. "
        '["/models"]; a base model path outside them, or under the data or artifact folders, is refused.',
    )
    storage_quota_bytes: int = Field(
        default=20 * 1024**3,
        ge=0,
        description="Most bytes one user's datasets and adapters may take, counted unpacked (0: unlimited; "
        "admins are not limited).",
    )
    webhook_poll_seconds: float = Field(
        default=2.0,
        ge=0,
        description="How often the web app's webhook dispatcher looks for finished jobs and due deliveries "
        "(0 switches the dispatcher off in this process).",
    )
    webhook_max_attempts: int = Field(
        default=8,
        ge=1,
        le=50,
        description="Attempts to deliver one webhook event before it is marked failed.",
    )
    webhook_retry_base_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Wait before the first retry of a failed delivery; each further retry waits twice as long.",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, description="How long one webhook delivery waits for the receiver to answer."
    )
    outbound_allowed_hosts: str = Field(
        default="",
        description="Comma-separated host names, addresses or CIDR networks that webhooks and MLflow tracking "
        "URIs may reach although they are loopback, private or link-local (app/core/netguard.py); empty: none.",
    )
    # ---- scale out ----
    artifact_url: str | None = Field(
        default=None,
        description="An fsspec URL of a bucket for datasets, checkpoints and adapters, e.g. "
        "s3://studio-artifacts/prefix (S3, MinIO); empty keeps them in artifact_root on local disk.",
    )
    artifact_cache_dir: Path | None = Field(
        default=None,
        description="Local folder for copies of bucket files (datasets, adapters) and training scratch space; "
        "empty means data_dir/cache.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of an S3-compatible store, e.g. http://minio:9000; empty: AWS."
    )
    s3_access_key_id: str | None = Field(
        default=None, description="Access key of the bucket; empty uses the usual AWS credential chain."
    )
    s3_secret_access_key: str | None = Field(default=None, description="Secret key of the bucket.")
    s3_region: str | None = Field(default=None, description="Region of the bucket (e.g. us-east-1).")
    supervised_by_pid: int | None = Field(
        default=None,
        description="Set by `serve` for the workers it starts: the worker exits when its parent is no longer "
        "this process (a fallback to the kernel's parent-death signal); leave it empty.",
    )
    worker_heartbeat_seconds: float = Field(
        default=10.0, gt=0, description="How often a worker writes its row on the workers page (alive, job)."
    )
    worker_gpu_count: int | None = Field(
        default=None,
        ge=0,
        description="GPUs a worker announces and routes by; empty detects them with nvidia-smi.",
    )
    database_pool_size: int = Field(
        default=5, ge=1, description="Postgres: connections kept open per process."
    )
    database_max_overflow: int = Field(
        default=45,
        ge=0,
        description="Postgres: extra connections a process may open at peak (closed when returned). With the pool "
        "it must exceed the web's 40 request threads, or requests wait on each other for a connection.",
    )
    database_pool_recycle_seconds: int = Field(
        default=1800, ge=-1, description="Postgres: reopen connections older than this (-1: never)."
    )

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> "Settings":
        if self.environment != "development" and self.secret_key == "change-me":
            raise ValueError("PEFT_STUDIO_SECRET_KEY must be set outside development")
        if self.admin_token is not None and len(self.admin_token) < 20:
            raise ValueError("PEFT_STUDIO_ADMIN_TOKEN must be at least 20 characters")
        return self

    @property
    def resolved_data_dir(self) -> Path:
        """The data folder as an absolute path."""
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data folder."""
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'studio.db'}"

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL, defaulting to kombu's SQLAlchemy transport on a SQLite file."""
        return self.broker_url or f"sqla+sqlite:///{self.resolved_data_dir / 'broker.db'}"

    @property
    def resolved_artifact_root(self) -> Path:
        """The artifact folder as an absolute path."""
        root = self.artifact_root or (self.resolved_data_dir / "artifacts")
        return root.expanduser().resolve()

    @property
    def resolved_artifact_cache_dir(self) -> Path:
        """The local cache of bucket files (and training scratch space) as an absolute path."""
        return (self.artifact_cache_dir or (self.resolved_data_dir / "cache")).expanduser().resolve()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
