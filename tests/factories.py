"""Plain factory functions for tests: rows straight into the database and artifact store, no queue."""

import io
from pathlib import Path
from typing import Any

from sqlmodel import Session

from app.core.models import Dataset, Job
from app.core.spec import JobSpec
from app.services.datasets import create_dataset as store_dataset
from tests.studio import SHARED_DATA


def sst2_bytes(rows: int, source: str = "train.csv", offset: int = 0) -> bytes:
    """``rows`` rows of the shared SST-2 data (after ``offset``) as CSV bytes with the header."""
    lines = (SHARED_DATA / "sst2" / source).read_text(encoding="utf-8").splitlines()
    return ("\n".join([lines[0], *lines[1 + offset : 1 + offset + rows]]) + "\n").encode()


def create_dataset(session: Session, data: bytes, filename: str = "data.csv") -> Dataset:
    """Store a dataset through the same validation as an upload."""
    return store_dataset(session, io.BytesIO(data), filename)


def create_job(session: Session, **spec_fields: Any) -> Job:
    """A queued job row for a spec (not sent to any queue: call worker.engine.run_job directly)."""
    spec = JobSpec.model_validate(spec_fields)
    job = Job(
        name=spec.name or "test job",
        spec=spec.model_dump(mode="json"),
        method=spec.method,
        base_model=spec.base_model,
        dataset_id=spec.dataset_id,
    )
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def write_text(path: Path, text: str) -> Path:
    """Write a text file and return its path."""
    path.write_text(text, encoding="utf-8")
    return path
