"""The training engine in-process (no queue): a real LoRA run on real data, the adapter and try-out."""

import json
from pathlib import Path

import pytest
from sqlmodel import Session, select

from app.core.db import get_engine
from app.core.models import Adapter, Job, JobStatus, MetricPoint
from app.core.storage import get_store
from tests.factories import create_dataset, create_job, sst2_bytes


@pytest.fixture
def session(studio_settings: Path):
    with Session(get_engine()) as db:
        yield db


def test_lora_job_trains_saves_and_predicts(session: Session) -> None:
    # given a 120-row slice of SST-2 and a short LoRA job
    dataset = create_dataset(session, sst2_bytes(120))
    job = create_job(
        session,
        dataset_id=dataset.id,
        training={
            "max_steps": 12,
            "batch_size": 16,
            "learning_rate": 2e-3,
            "logging_steps": 2,
            "eval_steps": 6,
            "max_length": 64,
        },
    )
    from worker.engine import run_job
    from worker.inference import WARM, classify

    # when the engine runs it
    run_job(job.id)

    # then the job succeeded with a logged, decreasing loss and a registered adapter
    session.expire_all()
    finished = session.get(Job, job.id)
    assert finished.status == JobStatus.succeeded, finished.error
    points = session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id)).all()
    train = [p.values["loss"] for p in points if p.split == "train"]
    evals = [p for p in points if p.split == "eval"]
    assert len(train) >= 5 and evals and "accuracy" in evals[-1].values
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()
    assert 0 < adapter.trainable_params < adapter.total_params
    assert adapter.labels == ["0", "1"]
    folder = get_store().path(adapter.storage_key)
    studio = json.loads((folder / "studio.json").read_text())
    assert studio["method"] == "lora" and (folder / "adapter_config.json").exists()

    # and try-out keeps the base warm: a second adapter call does not reload it
    first = classify(adapter.id, folder, ["a gorgeous, witty film"])
    loads = WARM.base_loads
    second = classify(adapter.id, folder, ["a gorgeous, witty film"])
    assert WARM.base_loads == loads
    assert first == second and abs(sum(first[0]["probabilities"].values()) - 1) < 1e-5


def test_job_without_validation_split_trains(session: Session) -> None:
    # given a job that holds out nothing for evaluation
    dataset = create_dataset(session, sst2_bytes(40))
    job = create_job(
        session,
        dataset_id=dataset.id,
        validation_fraction=0,
        training={"max_steps": 2, "batch_size": 8, "max_length": 32, "logging_steps": 1},
    )
    from worker.engine import run_job

    # when it runs, then it succeeds with train points only
    run_job(job.id)
    session.expire_all()
    assert session.get(Job, job.id).status == JobStatus.succeeded
    splits = {p.split for p in session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id)).all()}
    assert splits == {"train"}
