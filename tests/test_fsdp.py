"""FSDP (resources.strategy fsdp) on the CPU: two gloo ranks under torchrun shard a tiny Llama's LoRA job.

The same job on one process with the global batch (2 ranks x 4 = 8 examples, the whole dataset, so both runs see
the same examples every step) is the reference: the per-step loss and the saved adapter must match it within
float32 tolerance (the two runs add the same terms in another order; sharded gradients are reduce-scattered).
A second FSDP job is cancelled mid-run (every rank stops) and then resumed from its step-2 checkpoint to step 4:
it must end with the first job's adapter.
"""

import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file
from sqlmodel import Session, select

from app.core.db import get_engine
from app.core.models import Adapter, Job, JobEvent, JobStatus, MetricPoint
from app.core.storage import get_store
from app.services import checkpoints
from app.services.jobs import cancel_job
from tests import lm
from tests.factories import create_dataset, create_job
from tests.lm import alpaca_rows, json_bytes

pytestmark = pytest.mark.timeout(600)

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module

TRAINING = {
    "max_steps": 4,
    "batch_size": 4,
    "learning_rate": 1e-2,
    "lr_scheduler": "constant",
    "warmup_ratio": 0,
    "logging_steps": 1,
    "max_length": 128,
    "group_by_length": False,
    "save_steps": 2,
    "seed": 0,
}
LOSS_RTOL = 1e-5  # measured: equal to 1e-7
WEIGHT_ATOL = 1e-4


@pytest.fixture
def session(studio_settings: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PEFT_STUDIO_TORCH_THREADS", "1")
    from app.core.settings import get_settings

    get_settings.cache_clear()
    with Session(get_engine()) as db:
        yield db


def _losses(session: Session, job_id: int) -> list[float]:
    points = session.exec(
        select(MetricPoint).where(MetricPoint.job_id == job_id, MetricPoint.split == "train")
    ).all()
    return [p.values["loss"] for p in sorted(points, key=lambda p: p.step) if "loss" in p.values]


def _adapter_folder(session: Session, job_id: int) -> Path:
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job_id)).one()
    return get_store().local_dir(adapter.storage_key)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _loads_with_plain_peft(folder: Path, base: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(folder))
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # B starts at zero: these were trained
    return model


def run_sharded_and_single(
    session: Session, common: dict[str, Any], training: dict[str, Any], name: str
) -> tuple[Job, Job]:
    """A job on two FSDP gloo ranks and the same job on one process with the global batch (twice the per-rank
    batch, so both see the same examples every step), created and run in that order."""
    from worker.engine import run_job

    sharded = create_job(
        session,
        **common,
        training=training,
        resources={"num_processes": 2, "strategy": "fsdp", "accelerator": "cpu"},
    )
    single = create_job(session, **common, training={**training, "batch_size": 2 * training["batch_size"]})
    run_job(sharded.id, worker_name=f"{name}-fsdp")
    run_job(single.id, worker_name=f"{name}-single")
    session.expire_all()
    return sharded, single


def test_fsdp_on_two_gloo_ranks_trains_like_one_process_cancels_and_resumes(
    session: Session, tiny_lm: Path
) -> None:
    from worker.engine import run_job

    # given eight short examples and two jobs: FSDP on two CPU ranks, and one process with the global batch
    rows = [row | {"output": row["output"][:120]} for row in alpaca_rows(8)]
    dataset = create_dataset(session, json_bytes(rows), "alpaca8.json")
    common: dict[str, Any] = {
        "task": "causal-lm",
        "base_model": str(tiny_lm),
        "dataset_id": dataset.id,
        "validation_fraction": 0,
    }
    # when both run
    sharded, single = run_sharded_and_single(session, common, TRAINING, "test")

    # then the FSDP job succeeded, sharded over two gloo ranks
    job = session.get(Job, sharded.id)
    assert job is not None and job.status == JobStatus.succeeded, job and job.error
    events = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == sharded.id)).all()]
    assert any("2 processes on the CPU (gloo), fsdp" in message for message in events), events
    assert any(message.startswith("fsdp: ") and "sharded" in message for message in events), events

    # and its loss curve is the one-process curve
    fsdp_losses, one_losses = _losses(session, sharded.id), _losses(session, single.id)
    assert len(fsdp_losses) == TRAINING["max_steps"], fsdp_losses
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(one_losses), rtol=LOSS_RTOL, atol=0)

    # and its adapter is whole (gathered from the shards), loads with plain peft and has the same weights
    fsdp_folder, one_folder = _adapter_folder(session, sharded.id), _adapter_folder(session, single.id)
    fsdp_weights, one_weights = _weights(fsdp_folder), _weights(one_folder)
    assert fsdp_weights.keys() == one_weights.keys()
    for name, tensor in one_weights.items():
        torch.testing.assert_close(fsdp_weights[name], tensor, atol=WEIGHT_ATOL, rtol=0, msg=name)
    _loads_with_plain_peft(fsdp_folder, tiny_lm)

    # and each checkpoint holds a whole adapter too
    saved = checkpoints.list_checkpoints(session, sharded.id)
    assert [c.step for c in saved] == [2, 4]
    first = get_store().local_dir(saved[0].storage_key) / checkpoints.ADAPTER_FOLDER
    assert {k: v.shape for k, v in _weights(first).items()} == {k: v.shape for k, v in one_weights.items()}
    _loads_with_plain_peft(first, tiny_lm)

    # given a second FSDP job that runs until cancelled, checkpointing every 2 steps
    long_job = create_job(
        session,
        **common,
        training={**TRAINING, "max_steps": 10_000, "save_total_limit": 100},
        resources={"num_processes": 2, "strategy": "fsdp", "accelerator": "cpu"},
    )
    runner = threading.Thread(target=run_job, args=(long_job.id,), kwargs={"worker_name": "fsdp-cancel"})
    runner.start()
    deadline = time.monotonic() + 300
    while not checkpoints.list_checkpoints(session, long_job.id):
        assert time.monotonic() < deadline and runner.is_alive(), "the job never saved a checkpoint"
        time.sleep(0.5)
        session.expire_all()
    ranks = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "worker.distributed" in " ".join(p.info["cmdline"] or [])
        and str(long_job.id) in (p.info["cmdline"] or [])
    ]
    assert len(ranks) >= 2, ranks  # torchrun and its two ranks

    # when it is cancelled
    cancel_job(session, long_job.id)
    runner.join(timeout=120)

    # then the job is cancelled and no rank is left running
    assert not runner.is_alive()
    session.expire_all()
    cancelled = session.get(Job, long_job.id)
    assert cancelled is not None and cancelled.status == JobStatus.cancelled, cancelled
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, alive

    # when it runs again from its step-2 checkpoint (as after a lost worker), now for 4 steps in all
    checkpoints.delete_after(session, long_job.id, 2)
    cancelled.spec = {**cancelled.spec, "training": {**cancelled.spec["training"], "max_steps": 4}}
    cancelled.status, cancelled.cancel_requested = JobStatus.queued, False
    session.add(cancelled)
    session.commit()
    run_job(long_job.id, worker_name="fsdp-resume")

    # then it resumed there (optimizer state and all) and ends with the uninterrupted run's adapter
    session.expire_all()
    resumed_job = session.get(Job, long_job.id)
    assert resumed_job is not None and resumed_job.status == JobStatus.succeeded, resumed_job.error
    events = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == long_job.id)).all()]
    assert any("resuming from the checkpoint at step 2" in message for message in events), events
    resumed = _weights(_adapter_folder(session, long_job.id))
    for name, tensor in fsdp_weights.items():
        torch.testing.assert_close(resumed[name], tensor, atol=WEIGHT_ATOL, rtol=0, msg=name)
