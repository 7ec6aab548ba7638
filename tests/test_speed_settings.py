"""The speed and memory settings of a job (issue 22): validation, Liger's automatic choice, Trainer arguments, and
one real CPU run with gradient checkpointing and the fused AdamW."""

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlmodel import Session, select

from app.core.spec import JobSpec
from tests import lm
from tests.factories import create_dataset, create_job
from tests.lm import MEMORISE, json_bytes

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module


def _errors(**spec: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"dataset_id": 1, **spec})
    return {".".join(map(str, error["loc"])): error["msg"] for error in info.value.errors()}


def test_impossible_combinations_are_refused_with_the_field_and_the_fix() -> None:
    # FSDP shards across processes: one process has nothing to shard over
    errors = _errors(resources={"strategy": "fsdp"})
    assert "num_processes of 2 or more" in errors["resources"]

    # bitsandbytes' 8-bit and paged optimizers need a CUDA GPU
    for optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        for accelerator in ("cpu", "any"):
            errors = _errors(training={"optimizer": optimizer}, resources={"accelerator": accelerator})
            assert "set resources.accelerator to gpu" in errors["resources"], errors
        # also when the spec leaves resources out (its default is checked too)
        assert "set resources.accelerator to gpu" in _errors(training={"optimizer": optimizer})["resources"]

    # FlexAttention has no backward pass on CPUs, and only causal-LM jobs choose their attention
    errors = _errors(task="causal-lm", training={"attention": "flex_attention"})
    assert "no backward pass on CPUs; set resources.accelerator to gpu" in errors["resources"], errors
    errors = _errors(training={"attention": "eager"}, resources={"accelerator": "gpu"})
    assert "is for causal-lm jobs" in errors["resources"], errors
    errors = _errors(training={"attention": "sdpa_varlen"})
    assert "training.attention sdpa_varlen is for causal-lm jobs" in errors["resources"], errors

    # a studio adapter (not peft/transformers) cannot be gathered from FSDP shards
    errors = _errors(method="houlsby", resources={"strategy": "fsdp", "num_processes": 2})
    assert "choose ddp" in errors["resources"]

    # and unknown values name the field
    assert "training.gradient_checkpointing" in _errors(training={"gradient_checkpointing": "reentrant"})

    # while the sensible ones pass
    spec = JobSpec.model_validate(
        {
            "dataset_id": 1,
            "training": {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": "on", "liger": "off"},
            "resources": {"accelerator": "gpu", "strategy": "fsdp", "num_processes": 4},
        }
    )
    assert spec.resources.strategy == "fsdp" and spec.training.optimizer == "paged_adamw_8bit"
    flex = JobSpec.model_validate(
        {
            "dataset_id": 1,
            "task": "causal-lm",
            "training": {"attention": "flex_attention"},
            "resources": {"accelerator": "gpu"},
        }
    )
    assert flex.training.attention == "flex_attention"
    # per-example attention runs on CPUs too
    varlen = JobSpec.model_validate(
        {"dataset_id": 1, "task": "causal-lm", "training": {"attention": "sdpa_varlen"}}
    )
    assert varlen.training.attention == "sdpa_varlen"


def test_the_api_answers_an_impossible_combination_with_a_422(client: Any) -> None:
    response = client.post(  # type: ignore[attr-defined]
        "/api/v1/jobs",
        json={
            "dataset_id": 1,
            "training": {"optimizer": "paged_adamw_8bit"},
            "resources": {"accelerator": "cpu"},
        },
    )
    assert response.status_code == 422
    assert "bitsandbytes 8-bit optimizer for CUDA GPUs" in response.text


def test_liger_is_applied_only_on_cuda_with_the_package_and_a_supported_model() -> None:
    from types import SimpleNamespace

    from worker.speed import liger_choice

    auto = JobSpec.model_validate({"dataset_id": 1})
    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    gpt2 = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))

    assert liger_choice(auto, llama, cuda=False) == (
        False,
        "liger: off, its Triton kernels need a CUDA GPU and this worker has none",
    )
    assert liger_choice(auto, gpt2, cuda=True) == (False, "liger: off, it has no kernels for gpt2 models")
    use, why = liger_choice(auto, llama, cuda=True)
    try:
        import liger_kernel  # noqa: F401

        assert use and why.startswith("liger: on (llama")
    except ImportError:
        assert not use and "not installed" in why
    off = JobSpec.model_validate({"dataset_id": 1, "training": {"liger": "off"}})
    assert liger_choice(off, llama, cuda=True) == (False, "liger: off (the job's setting)")


def test_trainer_arguments_follow_the_settings(tmp_path: Path) -> None:
    from worker.training import training_arguments

    spec = JobSpec.model_validate(
        {
            "dataset_id": 1,
            "training": {
                "max_steps": 2,
                "learning_rate": 1e-3,
                "optimizer": "adamw_torch_fused",
                "gradient_checkpointing": "on",
            },
        }
    )
    args = training_arguments(spec, tmp_path, has_eval=False)
    assert str(args.optim) in ("adamw_torch_fused", "OptimizerNames.ADAMW_TORCH_FUSED")
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert not args.torch_compile


def test_the_estimate_counts_checkpointing_and_8bit_optimizer_state() -> None:
    from app.core.settings import BUNDLED_MODEL_ID
    from app.core.tasks import CLASSIFICATION
    from worker.estimate import estimate
    from worker.methods import get_method

    full = get_method("full")

    def memory(**kwargs: Any) -> Any:
        return estimate(
            BUNDLED_MODEL_ID,
            CLASSIFICATION,
            full,
            full.config.model_validate({}),
            num_labels=2,
            batch_size=32,
            max_length=128,
            **kwargs,
        ).memory

    plain, checkpointed, eight_bit = (
        memory(),
        memory(gradient_checkpointing=True),
        memory(optimizer="paged_adamw_8bit"),
    )
    assert checkpointed.activations_bytes < plain.activations_bytes / 2
    assert eight_bit.optimizer_bytes * 4 == plain.optimizer_bytes


def test_a_job_trains_with_checkpointing_and_the_fused_adamw(studio_settings: Path, tiny_lm: Path) -> None:
    from app.core.db import get_engine
    from app.core.models import Job, JobEvent, JobStatus
    from worker.engine import run_job

    with Session(get_engine()) as session:
        # given a causal-LM job with gradient checkpointing (non-reentrant) and the fused AdamW
        dataset = create_dataset(session, json_bytes(MEMORISE), "memorise.json")
        job = create_job(
            session,
            task="causal-lm",
            base_model=str(tiny_lm),
            dataset_id=dataset.id,
            validation_fraction=0,
            training={
                "max_steps": 2,
                "batch_size": 4,
                "max_length": 64,
                "learning_rate": 1e-2,
                "optimizer": "adamw_torch_fused",
                "gradient_checkpointing": "on",
            },
        )

        # when it runs on this CPU
        run_job(job.id)

        # then it succeeds, and its events say Liger was left off and why
        session.expire_all()
        finished = session.get(Job, job.id)
        assert finished is not None and finished.status == JobStatus.succeeded, finished and finished.error
        events = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == job.id)).all()]
        assert "liger: off, its Triton kernels need a CUDA GPU and this worker has none" in events, events
