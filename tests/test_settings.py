"""Settings: embedded defaults under the data folder, environment overrides, refused placeholder secrets."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PEFT_STUDIO_* variable from the caller's shell, and a fresh working directory."""
    for name in [f"PEFT_STUDIO_{field.upper()}" for field in Settings.model_fields]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_sqlite_database_and_broker_under_the_data_dir(tmp_path: Path) -> None:
    # given no environment at all
    # when
    settings = Settings()
    # then everything lives in ./data, resolved to an absolute path
    data = tmp_path.resolve() / "data"
    assert settings.resolved_data_dir == data
    assert settings.resolved_database_url == f"sqlite:///{data / 'studio.db'}"
    assert settings.resolved_broker_url == f"sqla+sqlite:///{data / 'broker.db'}"
    assert settings.resolved_artifact_root == data / "artifacts"
    assert settings.environment == "development"
    assert settings.queue_name == "training"


def test_data_dir_moves_every_embedded_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFT_STUDIO_DATA_DIR", str(tmp_path / "elsewhere"))

    settings = Settings()

    data = tmp_path.resolve() / "elsewhere"
    assert settings.resolved_database_url == f"sqlite:///{data / 'studio.db'}"
    assert settings.resolved_broker_url == f"sqla+sqlite:///{data / 'broker.db'}"
    assert settings.resolved_artifact_root == data / "artifacts"


def test_environment_overrides_every_kind_of_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # given scale-out settings in the environment
    monkeypatch.setenv("PEFT_STUDIO_DATABASE_URL", "postgresql+psycopg://studio@db:5432/studio")
    monkeypatch.setenv("PEFT_STUDIO_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("PEFT_STUDIO_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("PEFT_STUDIO_QUEUE_NAME", "gpu")
    monkeypatch.setenv("PEFT_STUDIO_MAX_UPLOAD_BYTES", "1024")
    monkeypatch.setenv("PEFT_STUDIO_STREAM_POLL_SECONDS", "1.5")
    monkeypatch.setenv("PEFT_STUDIO_TORCH_THREADS", "4")
    # when
    settings = Settings()
    # then they win over the embedded defaults, parsed to their types
    assert settings.resolved_database_url == "postgresql+psycopg://studio@db:5432/studio"
    assert settings.resolved_broker_url == "redis://redis:6379/0"
    assert settings.resolved_artifact_root == (tmp_path / "artifacts").resolve()
    assert settings.queue_name == "gpu"
    assert settings.max_upload_bytes == 1024
    assert settings.stream_poll_seconds == 1.5
    assert settings.torch_threads == 4


def test_a_malformed_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFT_STUDIO_MAX_UPLOAD_BYTES", "lots")

    with pytest.raises(ValidationError, match="max_upload_bytes"):
        Settings()


def test_placeholder_secret_is_refused_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFT_STUDIO_ENVIRONMENT", "production")

    with pytest.raises(ValidationError, match="PEFT_STUDIO_SECRET_KEY must be set"):
        Settings()


def test_a_real_secret_is_accepted_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFT_STUDIO_ENVIRONMENT", "production")
    monkeypatch.setenv("PEFT_STUDIO_SECRET_KEY", "a-long-random-value")

    assert Settings().secret_key == "a-long-random-value"


def test_placeholder_secret_is_fine_in_development() -> None:
    assert Settings().secret_key == "change-me"


def test_every_field_has_a_description() -> None:
    # the descriptions are what docs/configuration.md explains; an undescribed setting is undocumented
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"Settings fields without a description: {missing}"
