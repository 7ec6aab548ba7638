"""FSDP beyond tests/test_fsdp.py, on two gloo ranks against the same job on one process with the global batch:

* QLoRA + FSDP: the 4-bit weights (stored in the compute dtype, ``bnb_4bit_quant_storage``) are sharded with the
  rest; the loss curve and the adapter are the one-process QLoRA job's, and the adapter loads with plain peft.
* The best evaluation's weights: each rank snapshots and restores its own shards (DTensors) before the final
  gather, so the adapter is the best evaluation's, as a one-process job's is.
"""

import random
from pathlib import Path

import pytest
import torch
from sqlmodel import Session, select

from app.core.models import Job, JobEvent, JobStatus
from tests import lm, test_fsdp
from tests.factories import create_dataset
from tests.lm import alpaca_rows, json_bytes
from tests.test_fsdp import (
    LOSS_RTOL,
    TRAINING,
    _adapter_folder,
    _loads_with_plain_peft,
    _losses,
    _weights,
    run_sharded_and_single,
)

pytestmark = pytest.mark.timeout(300)

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module
session = test_fsdp.session  # the database session on one torch thread, as the FSDP tests use it

LEARNING_RATE = 0.03  # measured: held-out loss 6.857, 6.864, 6.918, 6.939 (step 1 is the best by 0.007)


def test_qlora_with_fsdp_shards_the_4bit_model_and_trains_like_one_process(
    session: Session, tiny_lm: Path
) -> None:
    # given eight short examples, and a QLoRA job on two FSDP ranks and on one process with the global batch
    rows = [row | {"output": row["output"][:120]} for row in alpaca_rows(8)]
    dataset = create_dataset(session, json_bytes(rows), "alpaca8.json")
    common = {
        "task": "causal-lm",
        "base_model": str(tiny_lm),
        "dataset_id": dataset.id,
        "validation_fraction": 0,
        "method": "qlora",
    }
    training = {**TRAINING, "max_steps": 3, "save_steps": 0}
    # when both run
    sharded, single = run_sharded_and_single(session, common, training, "qlora")

    # then the FSDP job sharded its (4-bit) model over both ranks and succeeded
    job = session.get(Job, sharded.id)
    assert job is not None and job.status == JobStatus.succeeded, job and job.error
    events = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == sharded.id)).all()]
    assert any(message.startswith("fsdp: ") and "sharded" in message for message in events), events

    # and its loss curve and adapter are the one-process QLoRA job's; the adapter loads with plain peft
    fsdp_losses, one_losses = _losses(session, sharded.id), _losses(session, single.id)
    assert len(fsdp_losses) == training["max_steps"], fsdp_losses
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(one_losses), rtol=LOSS_RTOL, atol=0)
    folder = _adapter_folder(session, sharded.id)
    fsdp_weights, one_weights = _weights(folder), _weights(_adapter_folder(session, single.id))
    assert fsdp_weights.keys() == one_weights.keys()
    for name, tensor in one_weights.items():
        torch.testing.assert_close(fsdp_weights[name], tensor, atol=1e-4, rtol=0, msg=name)
    _loads_with_plain_peft(folder, tiny_lm)


def test_an_fsdp_job_keeps_its_best_evaluation_as_one_process_does(session: Session, tiny_lm: Path) -> None:

    # given eight English training examples and four held-out ones of digits, which training on English makes
    # less likely after the first step: the first evaluation is the best
    rows = [row | {"output": row["output"][:120]} for row in alpaca_rows(8)]
    digits = random.Random(0)
    held_rows = [
        {
            "instruction": "Digits.",
            "input": "",
            "output": " ".join(str(digits.randrange(10)) for _ in range(40)),
        }
        for _ in range(4)
    ]
    train = create_dataset(session, json_bytes(rows), "alpaca8.json")
    held_out = create_dataset(session, json_bytes(held_rows), "digits4.json")
    training = {
        "max_steps": 4,
        "batch_size": 4,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler": "constant",
        "warmup_ratio": 0,
        "logging_steps": 1,
        "eval_steps": 1,
        "best_metric": "loss",
        "max_length": 128,
        "group_by_length": False,
        "save_steps": 0,
        "seed": 0,
    }
    common = {
        "task": "causal-lm",
        "base_model": str(tiny_lm),
        "dataset_id": train.id,
        "validation_dataset_id": held_out.id,
    }
    # when both run
    sharded, single = run_sharded_and_single(session, common, training, "best")

    # then both kept the same earlier evaluation and put its weights back
    kept = {}
    for job_id in (sharded.id, single.id):
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.succeeded, job and job.error
        events = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == job_id)).all()]
        kept[job_id] = next((m for m in events if "kept the best evaluation" in m), events)
    assert "restored its weights" in str(kept[single.id]), kept
    assert str(kept[sharded.id]).split(",")[0] == str(kept[single.id]).split(",")[0], kept

    # and the FSDP adapter (gathered after every rank restored its shards) is the one-process adapter
    fsdp_weights = _weights(_adapter_folder(session, sharded.id))
    one_weights = _weights(_adapter_folder(session, single.id))
    assert fsdp_weights.keys() == one_weights.keys()
    for name, tensor in one_weights.items():
        torch.testing.assert_close(fsdp_weights[name], tensor, atol=1e-4, rtol=0, msg=name)
