"""Checkpoints, resume, claims, the reaper and failure explanations, in-process (no queue, no subprocess)."""

import io
import math
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import Session, col, select
from transformers import TrainerCallback

from app.core.db import get_engine
from app.core.errors import InvalidSpec
from app.core.models import Adapter, Checkpoint, Dataset, Job, JobEvent, JobStatus, MetricPoint, utcnow
from app.core.spec import JobSpec
from app.core.storage import get_store
from tests.factories import create_dataset, create_job, sst2_bytes
from worker.methods import count_parameters, registry

ROWS = 8
STEPS = 4
METHOD_CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4},
    "qlora": {"r": 4, "target_modules": ["query", "value"]},
    # tfinal=2 of 4 steps: the rank pattern is fixed at step 2, the checkpoint the resumed run starts from, so
    # the resumed steps 3-4 need the pattern (and would crash on peft's None without the allocator state).
    "adalora": {"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 2},
    "loraplus": {"r": 4},
    "prefix": {"num_virtual_tokens": 4},
    "prompt": {"num_virtual_tokens": 4},
    "ptuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 32},
    "freeze": {"k": 1},
}


@pytest.fixture(autouse=True)
def no_broker(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str | None]]:
    """In-process tests run the engine directly: queueing only records what would be sent."""
    sent: list[tuple[int, str | None]] = []

    def enqueue(job_id: int, token: str | None = None) -> str:
        sent.append((job_id, token))
        return f"task-{job_id}-{len(sent)}"

    monkeypatch.setattr("app.core.queue.enqueue_training", enqueue)
    return sent


@pytest.fixture
def session(studio_settings: Path):
    with Session(get_engine()) as db:
        yield db


class Crash(TrainerCallback):
    """Kills the run (an exception out of trainer.train) when a step ends."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise RuntimeError(f"simulated crash at step {self.at_step}")


class PoisonLoss(TrainerCallback):
    """Makes the logged loss NaN from a step on (as a diverging run would)."""

    def __init__(self, from_step: int) -> None:
        self.from_step = from_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and state.global_step >= self.from_step:
            logs["loss"] = float("nan")


def _with_callbacks(monkeypatch: pytest.MonkeyPatch, *extra: TrainerCallback, models: list | None = None):
    from worker import training

    real = training.build_trainable

    def build(spec: JobSpec, *rest: Any):
        prepared, method, model, optimizer, callbacks = real(spec, *rest)
        if models is not None:
            models.append(model)
        return prepared, method, model, optimizer, [*callbacks, *extra]

    monkeypatch.setattr(training, "build_trainable", build)


def _dataset(session: Session) -> Dataset:
    """The test's one dataset (a second upload of the same file is refused as a duplicate)."""
    existing = session.exec(select(Dataset)).first()
    return existing or create_dataset(session, sst2_bytes(ROWS + 1))


def _job(session: Session, method: str = "lora", steps: int = STEPS, **training: Any) -> Job:
    dataset = _dataset(session)
    return create_job(
        session,
        dataset_id=dataset.id,
        method=method,
        method_config=METHOD_CONFIGS.get(method, {}),
        validation_fraction=1 / (ROWS + 1),
        training={
            "max_steps": steps,
            "batch_size": ROWS,
            "learning_rate": 5e-3 if method not in ("full", "llrd", "freeze") else 1e-4,
            "logging_steps": 1,
            "eval_steps": 1000,
            "max_length": 32,
            "save_steps": 2,
            "save_total_limit": 2,
            **training,
        },
    )


def _train_steps(session: Session, job_id: int) -> list[int]:
    session.expire_all()
    points = session.exec(
        select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(col(MetricPoint.id))
    ).all()
    return [p.step for p in points if p.split == "train"]


def _adapter_tensors(session: Session, job_id: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    adapter = session.exec(select(Adapter).where(Adapter.job_id == job_id)).one()
    folder = get_store().local_dir(adapter.storage_key)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    assert tensors, f"no weights in {sorted(p.name for p in folder.iterdir())}"
    return tensors


def _run_crash_and_resume(
    session: Session, monkeypatch: pytest.MonkeyPatch, job: Job, crash_at: int
) -> list[Any]:
    from app.services.jobs import resume_job
    from worker.engine import run_job

    with monkeypatch.context() as patch:
        _with_callbacks(patch, Crash(crash_at))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_job(job.id)
    session.expire_all()
    failed = session.get(Job, job.id)
    assert failed is not None and failed.status == JobStatus.failed
    assert "simulated crash" in (failed.error or "")
    # the steps logged after the last checkpoint exist now, and are replaced on resume
    assert max(_train_steps(session, job.id)) == crash_at - 1  # it crashed before logging that step
    resumed = resume_job(session, job.id)
    assert resumed.status == JobStatus.queued and resumed.run_token
    models: list[Any] = []
    with monkeypatch.context() as patch:
        _with_callbacks(patch, models=models)
        run_job(job.id, run_token=resumed.run_token)
    session.expire_all()
    done = session.get(Job, job.id)
    assert done is not None and done.status == JobStatus.succeeded, done and done.error
    return models


def test_lora_resume_continues_exactly_where_it_stopped(session: Session, monkeypatch) -> None:
    from worker.engine import run_job

    # given an uninterrupted reference run and the same job that crashes in step 6 (checkpoints at 2 and 4)
    reference = _job(session, steps=7)
    run_job(reference.id)
    job = _job(session, steps=7)

    # when it crashes and is resumed
    _run_crash_and_resume(session, monkeypatch, job, crash_at=6)

    # then the series has every step once, and the checkpoints kept are the newest two
    assert _train_steps(session, job.id) == [1, 2, 3, 4, 5, 6, 7]
    kept = session.exec(select(Checkpoint).where(Checkpoint.job_id == job.id)).all()
    assert sorted(c.step for c in kept) == [6, 7]  # every 2 steps, and the last
    assert all(math.isfinite(c.metrics["loss"]) for c in kept)
    assert not get_store().exists(f"jobs/{job.id}/checkpoints/step-4")
    # and optimizer, scheduler and data order continued: the final weights match the uninterrupted run
    expected, actual = _adapter_tensors(session, reference.id), _adapter_tensors(session, job.id)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    events = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == job.id)).all()]
    assert any("resuming from the checkpoint at step 4" in m for m in events), events


@pytest.mark.parametrize(
    "method", sorted(name for name, info in registry().items() if "sequence-classification" in info.tasks)
)
def test_every_method_checkpoints_and_resumes(session: Session, monkeypatch, method: str) -> None:
    from worker.engine import run_job

    # given an uninterrupted reference run, and the same job (same seed) that crashes in step 4, after its
    # checkpoint at step 2
    reference_models: list[Any] = []
    reference = _job(session, method=method)
    with monkeypatch.context() as patch:
        _with_callbacks(patch, models=reference_models)
        run_job(reference.id)
    job = _job(session, method=method)

    # when it is resumed
    models = _run_crash_and_resume(session, monkeypatch, job, crash_at=4)

    # then it finished with a continuous series, and the method was applied once to a fresh base: the resumed
    # model has the parameters of the reference run's, which build_trainable made once from the same spec
    assert _train_steps(session, job.id) == [1, 2, 3, 4]
    fresh = reference_models[0]
    resumed = models[0]
    assert [n for n, _ in resumed.named_parameters()] == [n for n, _ in fresh.named_parameters()]
    assert count_parameters(resumed) == count_parameters(fresh)
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()
    assert adapter.trainable_params == count_parameters(fresh)[0]
    # and it is the run it would have been: every trainable tensor equals the uninterrupted run's at the end
    # (float32 on CPU, same seed, data order, optimizer and scheduler state; the tolerance only absorbs
    # summation-order noise, far below one step's update at these learning rates)
    expected = {n: p.detach() for n, p in reference_models[0].named_parameters() if p.requires_grad}
    actual = {n: p.detach() for n, p in resumed.named_parameters() if p.requires_grad}
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    if method == "adalora":  # the allocator state came back too: the same rank pattern and importance scores
        pattern = resumed.peft_config["default"].rank_pattern
        assert pattern and pattern == reference_models[0].peft_config["default"].rank_pattern
        resumed_allocator = resumed.base_model.rankallocator
        reference_allocator = reference_models[0].base_model.rankallocator
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            mine, theirs = getattr(resumed_allocator, kind), getattr(reference_allocator, kind)
            assert mine.keys() == theirs.keys()
            for name in mine:
                torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adalora_resumed_inside_the_budget_phase_keeps_its_importance_scores(
    session: Session, monkeypatch
) -> None:
    from worker.engine import run_job

    # given AdaLoRA whose budget phase runs steps 1-4 (tfinal=2 of 6 steps, masking every step), an
    # uninterrupted reference run and the same job crashing in step 4, after the checkpoint at step 2
    config = {"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 2}
    monkeypatch.setitem(METHOD_CONFIGS, "adalora", config)
    reference_models: list[Any] = []
    reference = _job(session, method="adalora", steps=6)
    with monkeypatch.context() as patch:
        _with_callbacks(patch, models=reference_models)
        run_job(reference.id)
    job = _job(session, method="adalora", steps=6)

    # when it is resumed mid-budget (its importance EMAs hold two steps of history)
    resumed = _run_crash_and_resume(session, monkeypatch, job, crash_at=4)[0]

    # then the final rank pattern (decided at step 4 from the EMAs) and every weight match the reference run
    reference_model = reference_models[0]
    assert resumed.peft_config["default"].rank_pattern == reference_model.peft_config["default"].rank_pattern
    for (name, actual), (_, expected) in zip(
        resumed.named_parameters(), reference_model.named_parameters(), strict=True
    ):
        if actual.requires_grad:
            torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_checkpoint_download_and_listing(client, monkeypatch) -> None:
    from worker.engine import run_job

    with Session(get_engine()) as session:
        job = _job(session, steps=4)
        run_job(job.id)
        job_id = job.id
    listed = client.get(f"/api/v1/jobs/{job_id}/checkpoints")
    assert listed.status_code == 200, listed.text
    assert [c["step"] for c in listed.json()] == [2, 4]  # every 2 steps; step 4 is also the last
    assert "loss" in listed.json()[0]["metrics"]
    download = client.get(f"/api/v1/jobs/{job_id}/checkpoints/2/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
    assert "adapter_config.json" in names and "studio.json" in names
    missing = client.get(f"/api/v1/jobs/{job_id}/checkpoints/3/download")
    assert missing.status_code == 404 and "steps 2, 4" in missing.json()["detail"]
    # a succeeded job is neither resumed nor retried (that would train the same thing again): clone it instead
    refused = client.post(f"/api/v1/jobs/{job_id}/resume")
    assert refused.status_code == 409 and "retry" in refused.json()["detail"]
    refused = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert refused.status_code == 409 and f"/jobs/new?clone={job_id}" in refused.json()["detail"]


def test_resume_without_checkpoint_is_refused(client) -> None:
    with Session(get_engine()) as session:
        job = _job(session, save_steps=0)
        job.status = JobStatus.failed
        session.add(job)
        session.commit()
        job_id = job.id
    refused = client.post(f"/api/v1/jobs/{job_id}/resume")
    assert refused.status_code == 409 and "no checkpoint" in refused.json()["detail"]
    assert client.post("/api/v1/jobs/9999/resume").status_code == 404


def test_nan_loss_stops_early_and_says_where(session: Session, monkeypatch) -> None:
    from worker.engine import run_job

    job = _job(session, steps=8)
    _with_callbacks(monkeypatch, PoisonLoss(from_step=3))
    from worker.failures import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="step 3"):
        run_job(job.id)
    session.expire_all()
    failed = session.get(Job, job.id)
    assert failed.status == JobStatus.failed
    assert "loss became nan at step 3" in failed.error and "learning_rate" in failed.error
    assert failed.current_step == 3
    # no checkpoint of NaN weights
    steps = [c.step for c in session.exec(select(Checkpoint).where(Checkpoint.job_id == job.id)).all()]
    assert steps == [2]


def test_missing_target_modules_lists_what_exists(session: Session) -> None:
    from worker.engine import run_job

    dataset = _dataset(session)
    job = create_job(
        session,
        dataset_id=dataset.id,
        method="lora",
        method_config={"r": 4, "target_modules": ["q_proj", "v_proj"]},
        training={"max_steps": 1, "batch_size": 8, "max_length": 32},
    )
    from worker.failures import TargetModulesNotFound

    with pytest.raises(TargetModulesNotFound):
        run_job(job.id)
    session.expire_all()
    error = session.get(Job, job.id).error
    assert "target modules are not in the base model" in error
    assert "query" in error and "value" in error, error
    events = session.exec(select(JobEvent).where(JobEvent.job_id == job.id)).all()
    assert any(e.kind == "traceback" and "Traceback" in e.message for e in events)


def test_unreadable_model_is_explained(session: Session, tmp_path: Path) -> None:
    from worker.engine import run_job

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    dataset = _dataset(session)
    job = create_job(
        session, dataset_id=dataset.id, base_model=str(broken), training={"max_steps": 1, "max_length": 32}
    )
    with pytest.raises((OSError, ValueError, InvalidSpec)):
        run_job(job.id)
    session.expire_all()
    assert session.get(Job, job.id).error.startswith("The base model could not be loaded")


def test_out_of_memory_explanation_names_settings() -> None:
    from worker.failures import explain

    spec = JobSpec.model_validate({"dataset_id": 1, "training": {"batch_size": 64, "max_length": 512}})
    text = explain(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), spec)
    assert text.startswith("Out of memory")
    assert "batch_size (now 64, try 32" in text and "max_length (now 512, try 256)" in text
    assert "gradient" in text and "QLoRA" in text


def test_claim_runs_a_delivery_once(session: Session) -> None:
    from app.services.run_tokens import new_run_token
    from worker.engine import run_job

    job = _job(session, steps=1, save_steps=0)
    job.run_token = new_run_token()
    session.add(job)
    session.commit()
    token = job.run_token
    # a message with another token (superseded) is skipped and leaves the job alone
    run_job(job.id, run_token="stale")
    session.expire_all()
    assert session.get(Job, job.id).status == JobStatus.queued
    # the right one runs it, once; the same message delivered again is skipped
    run_job(job.id, run_token=token)
    run_job(job.id, run_token=token)
    session.expire_all()
    done = session.get(Job, job.id)
    assert done.status == JobStatus.succeeded and done.attempt == 1
    # a cancelled queued job is never started by a late message
    other = _job(session, steps=1, save_steps=0)
    other.status, other.cancel_requested = JobStatus.cancelled, True
    session.add(other)
    session.commit()
    run_job(other.id)
    session.expire_all()
    assert session.get(Job, other.id).started_at is None


def test_reaper_requeues_then_gives_up(session: Session, no_broker, monkeypatch) -> None:
    from app.core.settings import get_settings
    from app.services import recovery

    sent = no_broker
    job = _job(session, steps=1)
    job.status, job.worker, job.attempt, job.run_token = JobStatus.running, "gone@host", 1, "old"
    job.heartbeat_at = utcnow() - timedelta(seconds=get_settings().heartbeat_timeout_seconds + 5)
    session.add(job)
    fresh = _job(session, steps=1)
    fresh.status, fresh.run_token, fresh.heartbeat_at = JobStatus.running, "alive", utcnow()
    session.add(fresh)
    session.commit()

    # a stale job is requeued with a new token; a live one is left alone
    assert recovery.reap() == {job.id: "requeued"}
    session.expire_all()
    requeued = session.get(Job, job.id)
    assert requeued.status == JobStatus.queued and requeued.run_token not in (None, "old")
    assert sent == [(job.id, requeued.run_token)]
    assert session.get(Job, fresh.id).status == JobStatus.running
    # after max_attempts starts, a vanished worker fails the job with a reason
    requeued.status, requeued.attempt = JobStatus.running, get_settings().max_attempts
    requeued.heartbeat_at = utcnow() - timedelta(hours=1)
    session.add(requeued)
    session.commit()
    assert recovery.reap() == {job.id: "failed"}
    session.expire_all()
    failed = session.get(Job, job.id)
    assert failed.status == JobStatus.failed and "stopped responding" in failed.error
    # a restarted worker of the same name requeues what it left running once its heartbeat stays still (it
    # watches a fresh one for MISSED_BEATS intervals: 0.2 s heartbeats here, not the default 5 s)
    monkeypatch.setenv("PEFT_STUDIO_HEARTBEAT_SECONDS", "0.2")
    get_settings.cache_clear()
    fresh.worker, fresh.heartbeat_at = "w1@host", utcnow()
    session.add(fresh)
    session.commit()
    assert recovery.recover_orphans("w1@host") == {fresh.id: "requeued"}


def test_job_page_offers_resume_retry_and_checkpoint_downloads(client) -> None:
    with Session(get_engine()) as session:
        job = _job(session)
        job.status, job.error = JobStatus.failed, "RuntimeError: boom"
        session.add(job)
        session.add(Checkpoint(job_id=job.id, step=2, epoch=1.0, storage_key="jobs/x", metrics={"loss": 0.5}))
        session.commit()
        job_id = job.id
    page = client.get(f"/jobs/{job_id}", headers={"accept": "text/html"})
    assert page.status_code == 200, page.text[:500]
    assert "Resume from step 2" in page.text and 'data-testid="retry-job"' in page.text
    assert f"/api/v1/jobs/{job_id}/checkpoints/2/download" in page.text and "0.5000" in page.text
