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
        default=0.25, description="How often the live stream looks for new metric points in the database."
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

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> "Settings":
        if self.environment != "development" and self.secret_key == "change-me":
            raise ValueError("PEFT_STUDIO_SECRET_KEY must be set outside development")
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


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
