"""Multi-process training of one job on the CPU: num_processes=2 under torchrun with the gloo backend."""

import json
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open
from sqlmodel import Session, select

from app.core.db import get_engine
from app.core.models import Adapter, Job, JobEvent, JobStatus, MetricPoint
from app.core.storage import get_store
from tests.factories import create_dataset, create_job, sst2_bytes

pytestmark = pytest.mark.timeout(300)

# A few rows seen again and again: the loss must fall within a handful of steps.
TRAINING = {
    "max_steps": 8,
    "batch_size": 4,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "max_length": 32,
    "group_by_length": False,
}


@pytest.fixture
def session(studio_settings: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PEFT_STUDIO_TORCH_THREADS", "1")
    from app.core.settings import get_settings

    get_settings.cache_clear()
    with Session(get_engine()) as db:
        yield db


def _adapter_shape(session: Session, job_id: int) -> tuple[set[str], dict[str, list[int]], dict[str, object]]:
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job_id)).one()
    folder = get_store().local_dir(adapter.storage_key)
    files = {p.name for p in folder.iterdir()}
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        shapes = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
    config = json.loads((folder / "adapter_config.json").read_text())
    return files, shapes, config


def test_two_cpu_processes_train_one_job_like_one_process(session: Session) -> None:
    # given 16 SST-2 rows and two jobs that differ only in their number of processes
    dataset = create_dataset(session, sst2_bytes(16))
    common = {"dataset_id": dataset.id, "validation_fraction": 0, "training": TRAINING}
    ddp_job = create_job(session, **common, resources={"num_processes": 2, "accelerator": "cpu"})
    single_job = create_job(session, **{**common, "training": {**TRAINING, "max_steps": 2}})
    from worker.engine import run_job

    # when both run
    run_job(ddp_job.id, worker_name="ddp-test")
    run_job(single_job.id, worker_name="single-test")

    # then the two-process job succeeded on two gloo ranks
    session.expire_all()
    job = session.get(Job, ddp_job.id)
    assert job.status == JobStatus.succeeded, job.error
    events = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == ddp_job.id)).all()]
    assert any("2 processes on the CPU (gloo)" in message for message in events), events

    # and its metrics came once per step (rank 0 only), and the loss went down
    points = session.exec(
        select(MetricPoint).where(MetricPoint.job_id == ddp_job.id, MetricPoint.split == "train")
    ).all()
    steps = Counter(p.step for p in points)
    assert sorted(steps) == list(range(1, TRAINING["max_steps"] + 1)), steps
    assert set(steps.values()) == {1}
    losses = [p.values["loss"] for p in sorted(points, key=lambda p: p.step)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    # and its adapter has the single-process adapter's files, weights and config
    ddp_files, ddp_shapes, ddp_config = _adapter_shape(session, ddp_job.id)
    assert session.get(Job, single_job.id).status == JobStatus.succeeded
    one_files, one_shapes, one_config = _adapter_shape(session, single_job.id)
    assert ddp_files == one_files and ddp_shapes == one_shapes
    assert _comparable(ddp_config) == _comparable(one_config)


def _comparable(config: dict[str, object]) -> dict[str, object]:
    """An adapter config with its lists in a stable order (peft stores target_modules from a set)."""
    return {key: sorted(value) if isinstance(value, list) else value for key, value in config.items()}


def test_cancel_stops_every_rank(session: Session) -> None:
    import threading
    import time

    import psutil

    from app.services.jobs import cancel_job
    from worker.engine import run_job

    # given a long two-process job that has started logging
    dataset = create_dataset(session, sst2_bytes(16, offset=100))
    job = create_job(
        session,
        dataset_id=dataset.id,
        validation_fraction=0,
        training={**TRAINING, "max_steps": 10_000},
        resources={"num_processes": 2},
    )
    runner = threading.Thread(target=run_job, args=(job.id,), kwargs={"worker_name": "ddp-cancel"})
    runner.start()
    deadline = time.monotonic() + 240
    while not session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id)).first():
        assert time.monotonic() < deadline and runner.is_alive(), "the job never logged a step"
        time.sleep(0.5)
    ranks = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "worker.distributed" in " ".join(p.info["cmdline"] or [])
        and str(job.id) in (p.info["cmdline"] or [])
    ]
    assert len(ranks) >= 2, ranks  # torchrun and its two ranks

    # when it is cancelled
    cancel_job(session, job.id)
    runner.join(timeout=120)

    # then the job is cancelled and no rank (nor torchrun) is left running
    assert not runner.is_alive()
    session.expire_all()
    assert session.get(Job, job.id).status == JobStatus.cancelled
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, alive
