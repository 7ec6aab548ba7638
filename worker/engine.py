"""The training engine: build model and data for a job, apply its method, run transformers.Trainer."""

import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sqlmodel import select
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from app.base_models import resolve_base_model
from app.db import session_scope
from app.models import Adapter, Dataset, Job, JobStatus, MetricPoint, utcnow
from app.services.jobs import add_event
from app.settings import get_settings
from app.spec import JobSpec
from app.storage import get_store
from worker.methods import BuildContext, MethodInfo, count_parameters, get_method
from worker.recipes import Prepared, get_recipe

log = logging.getLogger(__name__)

STUDIO_FILE = "studio.json"


class JobCancelled(Exception):
    """Raised inside the engine when the job was cancelled before it started training."""


class StudioCallback(TrainerCallback):
    """Reports every logged step to the database and stops training when the job is cancelled."""

    def __init__(self, job_id: int, batch_size: int) -> None:
        self.job_id = job_id
        self.batch_size = batch_size
        self.cancel_poll = get_settings().cancel_poll_seconds
        self.cancelled = False
        self._started = time.monotonic()
        self._last_check = 0.0
        self._last_log_time = time.monotonic()
        self._last_log_step = 0

    def _cancel_requested(self) -> bool:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            if job is not None:
                job.heartbeat_at = utcnow()
                session.add(job)
                session.commit()
            return job is None or job.cancel_requested

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = time.monotonic()
        if now - self._last_check >= self.cancel_poll:
            self._last_check = now
            if self._cancel_requested():
                self.cancelled = True
                control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs:
            return
        now = time.monotonic()
        is_eval = any(key.startswith("eval_") for key in logs)
        is_summary = "train_runtime" in logs
        values = {
            key.removeprefix("eval_"): float(value)
            for key, value in logs.items()
            if isinstance(value, int | float) and key != "epoch"
        }
        if not is_eval and not is_summary:
            steps = state.global_step - self._last_log_step
            if steps > 0 and now > self._last_log_time:
                values["samples_per_second"] = steps * self.batch_size / (now - self._last_log_time)
            self._last_log_step, self._last_log_time = state.global_step, now
        elapsed = now - self._started
        total = state.max_steps or None
        with session_scope() as session:
            if not is_summary:
                session.add(
                    MetricPoint(
                        job_id=self.job_id,
                        step=state.global_step,
                        epoch=logs.get("epoch"),
                        split="eval" if is_eval else "train",
                        values=values,
                    )
                )
            job = session.get(Job, self.job_id)
            if job is not None:
                job.current_step = state.global_step
                job.total_steps = total
                job.progress = min(1.0, state.global_step / total) if total else 0.0
                if total and state.global_step:
                    job.eta_seconds = elapsed / state.global_step * (total - state.global_step)
                job.heartbeat_at = utcnow()
                session.add(job)
            session.commit()


def _start(job_id: int, worker_name: str) -> JobSpec:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobCancelled(f"job {job_id} no longer exists")
        if job.status.is_terminal or job.cancel_requested:
            raise JobCancelled(f"job {job_id} is {job.status}; nothing to do")
        job.status = JobStatus.running
        job.started_at = utcnow()
        job.heartbeat_at = utcnow()
        job.worker = worker_name
        add_event(session, job_id, "status", f"running on {worker_name}")
        session.add(job)
        session.commit()
        return JobSpec.model_validate(job.spec)


def _finish(job_id: int, status: JobStatus, message: str, error: str | None = None) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        job.status = status
        job.finished_at = utcnow()
        job.error = error
        if status == JobStatus.succeeded:
            job.progress = 1.0
            job.eta_seconds = 0.0
        add_event(session, job_id, "status", message)
        session.add(job)
        session.commit()


def mark_failed(job_id: int, error: str, traceback_text: str | None) -> None:
    """Record a failure: a readable error on the job and the traceback in its event log."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status.is_terminal:
            return
        job.status = JobStatus.failed
        job.error = error
        job.finished_at = utcnow()
        add_event(session, job_id, "error", error)
        if traceback_text:
            add_event(session, job_id, "traceback", traceback_text)
        session.add(job)
        session.commit()


def _load_datasets(spec: JobSpec) -> tuple[Dataset, Dataset | None]:
    with session_scope() as session:
        train = session.get(Dataset, spec.dataset_id)
        if train is None:
            raise ValueError(f"dataset {spec.dataset_id} was deleted before the job started")
        validation = session.get(Dataset, spec.validation_dataset_id) if spec.validation_dataset_id else None
        if spec.validation_dataset_id and validation is None:
            raise ValueError(
                f"validation dataset {spec.validation_dataset_id} was deleted before the job started"
            )
        session.expunge_all()
        return train, validation


def _folder_size(folder: Path) -> tuple[int, list[str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [str(p.relative_to(folder)) for p in files]


def _training_arguments(spec: JobSpec, output_dir: Path, has_eval: bool) -> TrainingArguments:
    training = spec.training
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=max(training.batch_size, 32),
        learning_rate=training.learning_rate,
        num_train_epochs=training.num_epochs or 1.0,
        max_steps=training.max_steps or -1,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,
        weight_decay=training.weight_decay,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if training.eval_steps else "epoch") if has_eval else "no",
        eval_steps=training.eval_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=training.seed,
        data_seed=training.seed,
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def _final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for entry in reversed(log_history):
        if "eval_loss" in entry:
            metrics = {
                key.removeprefix("eval_"): float(value)
                for key, value in entry.items()
                if key.startswith("eval_") and isinstance(value, int | float)
            }
            break
    train_losses = [entry["loss"] for entry in log_history if "loss" in entry]
    if train_losses:
        metrics["train_loss"] = float(train_losses[-1])
    return metrics


def total_steps(spec: JobSpec, train_examples: int | None) -> int | None:
    """Optimizer steps the Trainer will run: max steps, or epochs × batches per epoch (as Trainer counts)."""
    training = spec.training
    if training.max_steps or train_examples is None:
        return training.max_steps
    batches = max(1, math.ceil(train_examples / training.batch_size))
    return max(1, math.ceil((training.num_epochs or 1.0) * batches))


def build_trainable(spec: JobSpec) -> tuple[Prepared, MethodInfo, Any, Any, list[Any]]:
    """Load data and base model through the task's recipe and apply the job's method.

    Returns the prepared task, the method, the trainable model, an optimizer (or None for Trainer's) and the
    method's own Trainer callbacks.
    """
    train_ds, validation_ds = _load_datasets(spec)
    method = get_method(spec.method)
    settings = spec.method_settings()
    training = spec.training
    base = resolve_base_model(spec.base_model)
    context = BuildContext(
        task=spec.task,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        base_model_path=str(base.path),
    )
    # The method may change how the base model loads (e.g. 4-bit weights for QLoRA).
    load_kwargs = method.load_kwargs(settings, context)
    prepared = get_recipe(spec.task).prepare(spec, base, train_ds, validation_ds, load_kwargs)
    examples = len(prepared.train_dataset) if hasattr(prepared.train_dataset, "__len__") else None
    context = replace(
        context, num_labels=len(prepared.labels) or None, total_steps=total_steps(spec, examples)
    )
    # The method adds random weights next (e.g. LoRA's A matrices): seed them so a job is repeatable.
    set_seed(training.seed)
    built = method.build(prepared.model, settings, context)
    optimizer = built.optimizer_factory(built.model) if built.optimizer_factory else None
    return prepared, method, built.model, optimizer, built.callbacks


def run_job(job_id: int, worker_name: str = "worker") -> None:
    """Train one job end to end and register its adapter; failures propagate to the task's on_failure."""
    try:
        spec = _start(job_id, worker_name)
    except JobCancelled as reason:
        log.info("skipping job %s: %s", job_id, reason)
        return
    settings = get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    store = get_store()
    prepared, method, model, optimizer, method_callbacks = build_trainable(spec)
    work_dir = store.path(store.job_key(job_id, "trainer"))
    has_eval = bool(prepared.eval_dataset)
    callback = StudioCallback(job_id, spec.training.batch_size)
    trainer = Trainer(
        model=model,
        args=_training_arguments(spec, work_dir, has_eval),
        train_dataset=prepared.train_dataset,
        eval_dataset=prepared.eval_dataset if has_eval else None,
        data_collator=prepared.collator,
        processing_class=prepared.tokenizer,
        compute_metrics=prepared.compute_metrics,
        preprocess_logits_for_metrics=prepared.preprocess_logits,
        callbacks=[callback, *method_callbacks],
        optimizers=(optimizer, None),
    )
    trainer.train()
    shutil.rmtree(work_dir, ignore_errors=True)
    if callback.cancelled:
        _finish(job_id, JobStatus.cancelled, f"cancelled at step {trainer.state.global_step}")
        return
    adapter_key = store.job_key(job_id, "adapter")
    adapter_dir = store.path(adapter_key)
    save_adapter(model, method, prepared, adapter_dir, spec)
    trainable, total = count_parameters(model)
    size, files = _folder_size(adapter_dir)
    with session_scope() as session:
        existing = session.exec(select(Adapter).where(Adapter.job_id == job_id)).first()
        if existing is not None:
            session.delete(existing)
            session.flush()
        job = session.get(Job, job_id)
        session.add(
            Adapter(
                job_id=job_id,
                name=job.name if job else f"job {job_id}",
                method=spec.method,
                task=spec.task,
                base_model=spec.base_model,
                storage_key=adapter_key,
                size_bytes=size,
                files=files,
                trainable_params=trainable,
                total_params=total,
                labels=prepared.labels,
                metrics=_final_metrics(trainer.state.log_history),
            )
        )
        session.commit()
    _finish(job_id, JobStatus.succeeded, "succeeded")


def save_adapter(model: Any, method: MethodInfo, prepared: Prepared, folder: Path, spec: JobSpec) -> None:
    """Write the adapter folder: the method's files, the tokenizer, and studio.json saying how it was made."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    method.save(model, str(folder))
    prepared.tokenizer.save_pretrained(str(folder))
    studio = {
        "format": "peft-studio-adapter/1",
        "method": spec.method,
        "task": spec.task,
        "base_model": spec.base_model,
        "labels": prepared.labels,
        "max_length": spec.training.max_length,
        **prepared.metadata,
        "spec": spec.model_dump(mode="json"),
    }
    (folder / STUDIO_FILE).write_text(json.dumps(studio, indent=2), encoding="utf-8")
