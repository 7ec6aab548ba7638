"""Job spec validation: the pydantic contract (field names in errors) and validate_spec against the database.

The malformed-spec corpus runs through the API in test_bad_input.py; these tests cover what it cannot:
accepted specs, specs that reach the queue, and datasets stored before the profile recorded rows.
"""

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlmodel import Session, func, select

from app.core.errors import InvalidSpec, ServiceUnavailable
from app.core.models import Dataset, Job, JobEvent, Worker
from app.core.spec import JobSpec

CSV = b"text,label\ngood movie,pos\nbad movie,neg\nlovely film,pos\nawful film,neg\ngreat,pos\npoor,neg\n"


@pytest.fixture
def session(studio_settings: Path) -> Iterator[Session]:
    """A session on a fresh, migrated SQLite database."""
    from app.core.db import get_engine

    with Session(get_engine()) as db_session:
        yield db_session


def _dataset(session: Session, data: bytes = CSV, filename: str = "reviews.csv") -> Dataset:
    from app.services.datasets import create_dataset

    return create_dataset(session, io.BytesIO(data), filename)


def _error_fields(**spec: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec)
    return {".".join(map(str, error["loc"])): error["msg"] for error in info.value.errors()}


# ---- the pydantic contract ----------------------------------------------------------------------


def test_unknown_method_is_reported_on_the_method_field() -> None:
    errors = _error_fields(dataset_id=1, method="nope")

    assert list(errors) == ["method"]
    assert "unknown method 'nope'" in errors["method"]


def test_method_config_errors_name_the_setting() -> None:
    errors = _error_fields(dataset_id=1, method_config={"r": 0, "target_modules": []})

    assert set(errors) == {"method_config.r", "method_config.target_modules"}


def test_method_config_refuses_unknown_settings() -> None:
    errors = _error_fields(dataset_id=1, method_config={"rank": 4, "r": 4})

    assert "unknown setting(s) 'rank' for method 'lora'" in errors["method_config"]


def test_method_config_is_filled_with_defaults() -> None:
    spec = JobSpec.model_validate({"dataset_id": 1, "method_config": {"r": 4}})

    assert spec.method_config["r"] == 4
    assert spec.method_config["target_modules"]


# ---- validate_spec ------------------------------------------------------------------------------


def test_a_good_spec_passes(session: Session) -> None:
    from app.services.jobs import validate_spec

    dataset = _dataset(session)
    validation = _dataset(session, CSV + b"fine film,pos\n", "dev.csv")

    validate_spec(session, JobSpec(dataset_id=dataset.id or 0))
    validate_spec(session, JobSpec(dataset_id=dataset.id or 0, validation_dataset_id=validation.id))
    validate_spec(session, JobSpec(dataset_id=dataset.id or 0, validation_fraction=0))


def test_numeric_labels_are_fine(session: Session) -> None:
    from app.services.jobs import validate_spec

    data = b"".join(b'{"text": "row %d", "label": %d}\n' % (i, i % 2) for i in range(4))
    dataset = _dataset(session, data, "numbers.jsonl")

    validate_spec(session, JobSpec(dataset_id=dataset.id or 0, validation_fraction=0.25))


def test_profile_stored_before_rows_were_recorded_still_gives_a_message(session: Session) -> None:
    from app.services.jobs import validate_spec

    dataset = _dataset(session)
    profile = dict(dataset.profile)
    profile["columns"] = {
        "text": {"type": "string", "missing": 0},
        "label": {"type": "string", "missing": 2, "distinct": 2},
    }
    dataset.profile = profile
    session.add(dataset)
    session.commit()

    with pytest.raises(InvalidSpec, match="is empty in 2 row\\(s\\); every row needs a label") as info:
        validate_spec(session, JobSpec(dataset_id=dataset.id or 0))
    assert info.value.field == "label_column"


# ---- create_job keeps nothing when it cannot queue ----------------------------------------------


def _counts(session: Session) -> tuple[int, int]:
    jobs = session.exec(select(func.count()).select_from(Job)).one()
    events = session.exec(select(func.count()).select_from(JobEvent)).one()
    return jobs, events


def test_refused_spec_never_reaches_the_queue(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.core.queue
    from app.services.jobs import create_job

    dataset = _dataset(session)
    sent: list[int] = []

    def record(job_id: int, *args: object, **kwargs: object) -> str:
        sent.append(job_id)
        return f"task-{job_id}"

    monkeypatch.setattr(app.core.queue, "enqueue_training", record)

    with pytest.raises(InvalidSpec):
        create_job(session, JobSpec(dataset_id=dataset.id or 0, label_column="missing"))
    assert sent == []
    assert _counts(session) == (0, 0)


def test_unreachable_queue_leaves_no_job_and_no_event(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.core.queue
    from app.services.jobs import create_job

    dataset = _dataset(session)

    def broker_down(job_id: int, *args: object, **kwargs: object) -> str:
        raise ConnectionError("broker is down")

    monkeypatch.setattr(app.core.queue, "enqueue_training", broker_down)

    with pytest.raises(ServiceUnavailable, match="broker is down"):
        create_job(session, JobSpec(dataset_id=dataset.id or 0))
    assert _counts(session) == (0, 0)


def test_valid_spec_is_queued_once(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.core.queue
    from app.services.jobs import create_job

    dataset = _dataset(session)
    sent: list[int] = []

    def record(job_id: int, *args: object, **kwargs: object) -> str:
        sent.append(job_id)
        return f"task-{job_id}"

    monkeypatch.setattr(app.core.queue, "enqueue_training", record)
    # a connected worker (without one the job also gets a "waiting" event: tests/test_security_network.py)
    session.add(Worker(name="w1@host", hostname="host", queues=["training", "training.cpu"]))
    session.commit()

    job = create_job(session, JobSpec(dataset_id=dataset.id or 0))

    assert sent == [job.id]
    assert job.task_id == f"task-{job.id}"
    # one job, its "queued" event and the "config" event explaining its auto settings (docs/defaults.md)
    assert _counts(session) == (1, 2)
