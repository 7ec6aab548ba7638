"""The training engine: build model and data for a job, apply its method, run transformers.Trainer."""

import gc
import json
import logging
import math
import queue
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import update
from sqlmodel import col, select
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from app.core.autoconfig import needs_resolution, resolve_spec, resolve_training, rule_inputs_for
from app.core.base_models import resolve_base_model
from app.core.db import session_scope
from app.core.events import publish
from app.core.models import Adapter, Dataset, Job, JobStatus, MetricPoint, utcnow
from app.core.settings import get_settings
from app.core.spec import JobSpec
from app.core.storage import get_store
from app.services import checkpoints
from app.services.jobs import add_event
from worker.best import BestModelCallback, metric_for
from worker.distributed import is_main_process
from worker.distributed import launch as launch_distributed
from worker.failures import TargetModulesNotFound, explain, module_names
from worker.methods import BuildContext, MethodInfo, count_parameters, get_method
from worker.model_card import point_at_labelled_base, write_model_card
from worker.recipes import Prepared, get_recipe
from worker.resilience import (
    Heartbeat,
    ResilienceCallback,
    checkpoint_metrics,
    free_memory,
    prepare_resume,
    remove_dir,
    resumable_trainer_class,
    save_trainable,
)
from worker.telemetry import TelemetryCallback
from worker.tracking import tracking_callbacks

log = logging.getLogger(__name__)

STUDIO_FILE = "studio.json"


class JobCancelled(Exception):
    """Raised inside the engine when the job was cancelled before it started training."""


class MetricWriter:
    """Writes a job's metric points and progress to the database on a background thread, in batches.

    The training loop only puts items on a bounded queue (it blocks only when the writer is that far behind,
    so nothing is ever dropped); the thread writes whatever has queued up in one transaction, publishes the
    news for live streams (Redis pub/sub when the broker is Redis) and, every ``cancel_poll`` seconds, writes
    the heartbeat and reads the job's cancel flag. ``close`` writes everything still queued, in order.

    With a ``run_token``, every write is fenced by it: one transaction first updates the job row only while it
    still carries the token (which also locks the row against a requeue), then adds the points. When the token is
    gone (the job was requeued to another worker, or finished), nothing is written, ``lost`` is set (the
    heartbeat's event, so the training loop stops) and the writer drops whatever else it is handed.
    """

    def __init__(
        self,
        job_id: int,
        cancel_poll: float,
        capacity: int = 1000,
        batch: int = 200,
        run_token: str | None = None,
        attempt: int = 0,
        lost: threading.Event | None = None,
    ) -> None:
        self.job_id = job_id
        self.cancel_poll = cancel_poll
        self.batch = batch
        self.run_token = run_token
        self.attempt = attempt
        self.lost = lost if lost is not None else threading.Event()
        self.cancel_requested = threading.Event()
        self.written = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=capacity)
        self._last_check = 0.0
        self._thread = threading.Thread(target=self._run, name=f"metrics-job-{job_id}", daemon=True)
        self._thread.start()

    def put(self, item: dict[str, Any]) -> None:
        """Queue a metric point (``{"point": {...}}``) and/or progress (``{"progress": {...}}``)."""
        if not self._thread.is_alive():  # closed (or broken): write in the caller's thread
            self._write([item], check=False)
            return
        self._queue.put(item)

    def close(self, timeout: float = 60.0) -> None:
        """Write everything queued and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            items: list[dict[str, Any]] = []
            try:
                first = self._queue.get(timeout=self.cancel_poll)
                if first is None:
                    stop = True
                else:
                    items.append(first)
                while not stop and len(items) < self.batch:
                    item = self._queue.get_nowait()
                    if item is None:
                        stop = True
                    else:
                        items.append(item)
            except queue.Empty:
                pass
            now = time.monotonic()
            check = now - self._last_check >= self.cancel_poll
            if not items and not check:
                continue
            if check:
                self._last_check = now
            try:
                self._write(items, check)
            except Exception as error:  # noqa: BLE001 - keep training; the points are retried once at close
                log.warning("job %s: could not write %d metric item(s): %s", self.job_id, len(items), error)
                self.error = error
                time.sleep(0.2)
                try:
                    self._write(items, check)
                except Exception:  # noqa: BLE001
                    log.exception("job %s: dropped %d metric item(s)", self.job_id, len(items))

    def _write(self, items: list[dict[str, Any]], check: bool) -> None:
        if self.lost.is_set():  # superseded: the job is someone else's now, write nothing
            return
        progress = next((item["progress"] for item in reversed(items) if "progress" in item), None)
        last_id: int | None = None
        with session_scope() as session:
            rows = [
                MetricPoint(job_id=self.job_id, attempt=self.attempt, **item["point"])
                for item in items
                if "point" in item
            ]
            if rows or progress or check:
                # The fence: this UPDATE matches only while the job carries our token, and holds the row (Postgres)
                # or the database (SQLite) until commit, so a requeue cannot slip in between it and the points.
                guard = [col(Job.id) == self.job_id]
                if self.run_token is not None:
                    guard.append(col(Job.run_token) == self.run_token)
                fenced = session.execute(
                    update(Job).where(*guard).values(heartbeat_at=utcnow(), **(progress or {}))
                )
                if fenced.rowcount != 1:  # type: ignore[attr-defined]
                    session.rollback()
                    if self.run_token is not None:
                        log.warning(
                            "job %s: this worker no longer holds the job; its writer stops", self.job_id
                        )
                        self.lost.set()
                    self.cancel_requested.set()
                    return
                if check:
                    cancel = session.execute(select(Job.cancel_requested).where(col(Job.id) == self.job_id))
                    if cancel.scalar():
                        self.cancel_requested.set()
            session.add_all(rows)
            session.commit()
            if rows:
                last_id = rows[-1].id
        self.written += len(rows)
        if rows or progress:
            publish(self.job_id, last_id)


class StudioCallback(TrainerCallback):
    """Reports logged steps to the database and stops training when the job is cancelled.

    Nothing here blocks a training step on the database: points go through a ``MetricWriter`` (a background
    thread, batched writes) and the cancel flag is read by that thread, so ``on_step_end`` only reads an Event.
    """

    def __init__(
        self,
        job_id: int,
        batch_size: int,
        run_token: str | None = None,
        attempt: int = 0,
        lost: threading.Event | None = None,
    ) -> None:
        self.job_id = job_id
        self.batch_size = batch_size
        self.cancelled = False
        self.writer = MetricWriter(
            job_id, get_settings().cancel_poll_seconds, run_token=run_token, attempt=attempt, lost=lost
        )
        # Trainer.train starts with a full gc.collect (accelerate's free_memory), which walks every object of
        # torch and transformers: seconds on a busy CPU, on the way to the first step. Freezing what exists
        # now (the loaded modules, the model) skips them; on_train_end unfreezes, so nothing leaks across jobs.
        gc.freeze()
        self._frozen = True
        self._started = time.monotonic()
        self._last_log_time = time.monotonic()
        self._last_log_step = 0

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.writer.lost.is_set():  # superseded: stop, and save nothing (the job is someone else's)
            control.should_training_stop = True
            control.should_save = False
        elif self.writer.cancel_requested.is_set():
            self.cancelled = True
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        """Write every queued point (end of training, cancel, or failure) and unfreeze the garbage collector."""
        self.writer.close()
        if self._frozen:
            self._frozen = False
            gc.unfreeze()

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
        progress: dict[str, Any] = {
            "current_step": state.global_step,
            "total_steps": total,
            "progress": min(1.0, state.global_step / total) if total else 0.0,
        }
        if total and state.global_step:
            progress["eta_seconds"] = elapsed / state.global_step * (total - state.global_step)
        item: dict[str, Any] = {"progress": progress}
        if not is_summary:
            item["point"] = {
                "step": state.global_step,
                "epoch": logs.get("epoch"),
                "split": "eval" if is_eval else "train",
                "values": values,
                "created_at": utcnow(),  # when it was logged, not when the writer got to it
            }
        self.writer.put(item)


@dataclass
class Claim:
    """A job this worker holds: its spec, the token of this run, and which start this is."""

    spec: JobSpec
    run_token: str
    attempt: int


def _start(job_id: int, worker_name: str, run_token: str | None = None) -> Claim:
    """Claim a queued job atomically: only the delivery whose token matches runs it, once.

    A redelivered message, one superseded by a requeue (new token), or one for a cancelled job is skipped
    (JobCancelled). The running job gets a fresh token that its heartbeat and final writes are checked against.
    """
    from app.services.recovery import new_run_token

    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobCancelled(f"job {job_id} no longer exists")
        if job.status != JobStatus.queued or job.cancel_requested:
            raise JobCancelled(f"job {job_id} is {job.status}; nothing to do")
        if run_token is not None and job.run_token != run_token:
            raise JobCancelled(f"job {job_id} was requeued since this message was sent; skipping it")
        guard = [
            col(Job.id) == job_id,
            col(Job.status) == JobStatus.queued,
            col(Job.cancel_requested).is_(False),
        ]
        guard.append(col(Job.run_token) == job.run_token if job.run_token else col(Job.run_token).is_(None))
        token, attempt, now = new_run_token(), job.attempt + 1, utcnow()
        result = session.execute(
            update(Job)
            .where(*guard)
            .values(
                status=JobStatus.running,
                run_token=token,
                attempt=attempt,
                worker=worker_name,
                started_at=job.started_at or now,
                heartbeat_at=now,
                finished_at=None,
                error=None,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            raise JobCancelled(f"job {job_id} was claimed or changed by someone else; skipping it")
        again = f" (attempt {attempt})" if attempt > 1 else ""
        add_event(session, job_id, "status", f"running on {worker_name}{again}")
        session.commit()
        return Claim(JobSpec.model_validate(job.spec), token, attempt)


def _holds(job: Job | None, run_token: str | None) -> bool:
    return job is not None and (run_token is None or job.run_token == run_token)


def _finish(
    job_id: int, status: JobStatus, message: str, error: str | None = None, run_token: str | None = None
) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not _holds(job, run_token):
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


def mark_failed(job_id: int, error: str, traceback_text: str | None, run_token: str | None = None) -> None:
    """Record a failure: a readable error on the job and the traceback in its event log.

    With ``run_token``, only while the job still carries that token (a worker that lost the job to a
    requeue does not fail it).
    """
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status.is_terminal or not _holds(job, run_token):
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


MIN_DEFAULT_SAVE_STEPS = 25


def save_every(spec: JobSpec, steps: int | None) -> int:
    """Checkpoint interval in steps: the spec's, or about 10% of the run (at least 25 steps) when it is empty; 0 for none.

    The floor keeps short jobs from spending more time saving than training (a save costs about a second).
    """
    if spec.training.save_steps is not None:
        return spec.training.save_steps
    return max(MIN_DEFAULT_SAVE_STEPS, math.ceil(steps / 10)) if steps else 0


def _training_arguments(
    spec: JobSpec, output_dir: Path, has_eval: bool, save_steps: int = 0
) -> TrainingArguments:
    training = spec.training
    if needs_resolution(training):  # a spec from outside the engine (a test): the rule without row counts
        training = resolve_training(training, rule_inputs_for(spec, 0, 0)).training
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=max(training.batch_size, 32),
        learning_rate=float(training.learning_rate),
        num_train_epochs=float(training.num_epochs or 1.0),
        max_steps=training.max_steps or -1,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=float(training.warmup_ratio),
        weight_decay=training.weight_decay,
        logging_steps=int(training.logging_steps),
        logging_first_step=True,
        eval_strategy=("steps" if training.eval_steps else "epoch") if has_eval else "no",
        eval_steps=int(training.eval_steps) if training.eval_steps else None,
        # Checkpoints go to the local output dir (the newest one only); ResilienceCallback copies each to the
        # artifact store and keeps the newest save_total_limit there.
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=1,
        save_only_model=False,
        logging_nan_inf_filter=False,  # a NaN loss must show (and stop the job), not be averaged away
        report_to="none",
        disable_tqdm=True,
        seed=training.seed,
        data_seed=training.seed,
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        use_cpu=not torch.cuda.is_available(),
        bf16=resolved_precision(training.precision) == "bf16",
        fp16=resolved_precision(training.precision) == "fp16",
        dataloader_num_workers=0,
    )


def resolved_precision(choice: str) -> str:
    """``auto`` is bf16 mixed precision on a CUDA GPU that supports it, fp32 elsewhere (CPUs, older GPUs)."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


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
    training = resolved(spec).training
    if training.max_steps or train_examples is None:
        return training.max_steps
    batches = max(1, math.ceil(train_examples / training.batch_size))
    return max(1, math.ceil(float(training.num_epochs or 1.0) * batches))


def resolved(spec: JobSpec) -> JobSpec:
    """The spec with its ``auto`` training settings chosen (app/core/autoconfig.py); jobs queued through the API
    arrive resolved, specs built elsewhere (tests, benchmarks) are resolved here from the same rule."""
    if not needs_resolution(spec.training):
        return spec
    with session_scope() as session:
        return resolve_spec(session, spec)[0]


def build_trainable(spec: JobSpec) -> tuple[Prepared, MethodInfo, Any, Any, list[Any]]:
    """Load data and base model through the task's recipe and apply the job's method.

    Returns the prepared task, the method, the trainable model, an optimizer (or None for Trainer's) and the
    method's own Trainer callbacks.
    """
    spec = resolved(spec)
    train_ds, validation_ds = _load_datasets(spec)
    method = get_method(spec.method)
    settings = spec.method_settings()
    training = spec.training
    base = resolve_base_model(spec.base_model)
    context = BuildContext(
        task=spec.task,
        learning_rate=float(training.learning_rate),
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
    try:
        built = method.build(prepared.model, settings, context)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        if "target module" in str(exc).lower():
            raise TargetModulesNotFound(str(exc), module_names(prepared.model)) from exc
        raise
    optimizer = built.optimizer_factory(built.model) if built.optimizer_factory else None
    return prepared, method, built.model, optimizer, built.callbacks


def run_job(job_id: int, worker_name: str = "worker", run_token: str | None = None) -> None:
    """Train one job end to end and register its adapter; failures propagate to the task's on_failure.

    The job is claimed with ``run_token`` (skipped when it no longer matches); a job with checkpoints
    resumes from the newest. Whatever happens, the heartbeat stops and memory is given back.
    """
    try:
        claim = _start(job_id, worker_name, run_token)
    except JobCancelled as reason:
        log.info("skipping job %s: %s", job_id, reason)
        return
    settings = get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    store = get_store()
    work_dir = store.scratch_dir(f"job-{job_id}")
    heartbeat = Heartbeat(job_id, claim.run_token).start()
    try:
        if claim.spec.resources.num_processes > 1:
            # Scale out: DDP ranks under torchrun train the job; this process watches them (worker/distributed.py).
            launch_distributed(job_id, claim, work_dir, heartbeat)
        else:
            _train(job_id, claim, store, work_dir, heartbeat)
    except Exception as exc:
        if not heartbeat.lost.is_set():
            mark_failed(job_id, explain(exc, claim.spec), traceback.format_exc(), run_token=claim.run_token)
        # The traceback's finished frames still hold the model, optimizer and batches (an OOM's traceback pinned
        # ~1 GiB of CUDA memory on an H200 until the next job's cleanup): drop their locals before freeing.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        heartbeat.stop()
        remove_dir(work_dir)
        free_memory()


def _train(job_id: int, claim: Claim, store: Any, work_dir: Path, heartbeat: Heartbeat) -> None:
    spec = claim.spec
    if needs_resolution(spec.training):
        with session_scope() as session:
            spec, explanation = resolve_spec(session, spec)
            if explanation and is_main_process():
                add_event(session, job_id, "config", explanation)
                session.commit()
    resume_from, resume_step = prepare_resume(job_id, store, work_dir / "output")
    set_seed(spec.training.seed)  # the new head's random init too: a rerun or resumed run starts the same
    prepared, method, model, optimizer, method_callbacks = build_trainable(spec)
    has_eval = bool(prepared.eval_dataset)
    examples = len(prepared.train_dataset) if hasattr(prepared.train_dataset, "__len__") else None
    save_steps = save_every(spec, total_steps(spec, examples))
    # Scale out (DDP): only rank 0 reports metrics, checks for cancel and saves; other ranks only train.
    main_process = is_main_process()
    callback = (
        StudioCallback(job_id, spec.training.batch_size, claim.run_token, claim.attempt, lost=heartbeat.lost)
        if main_process
        else None
    )

    def store_checkpoint(folder: Path, state: TrainerState) -> None:
        save_trainable(model, folder, method)
        save_adapter(model, method, prepared, folder / checkpoints.ADAPTER_FOLDER, spec)
        key = checkpoints.checkpoint_key(job_id, state.global_step)
        store.put_dir(folder, key)
        with session_scope() as session:
            checkpoints.record_checkpoint(
                session,
                job_id,
                state.global_step,
                state.epoch,
                key,
                checkpoint_metrics(state.log_history, state.global_step),
                spec.training.save_total_limit,
            )

    guard = ResilienceCallback(
        heartbeat,
        store_checkpoint if save_steps else None,
        job_id=job_id,
    )
    # The adapter keeps the best evaluation's weights (worker/best.py); every rank decides alike.
    # AdaLoRA is left out: its final rank pattern decides which of the weights are saved, so earlier ones
    # put back would not be the ones evaluated.
    keeps_best = has_eval and spec.method != "adalora"
    best_metric = metric_for(spec.training.best_metric, spec.task) if keeps_best else None
    best = (
        BestModelCallback(
            model,
            best_metric,
            spec.training.early_stopping_patience,
            structured_from=prepared.compute_metrics,
        )
        if best_metric
        else None
    )
    best_callbacks = [best] if best is not None else []
    trainer = resumable_trainer_class(Trainer, method)(  # engine.Trainer: benchmarks swap it for a timed one
        model=model,
        args=_training_arguments(spec, work_dir / "output", has_eval, save_steps),
        train_dataset=prepared.train_dataset,
        eval_dataset=prepared.eval_dataset if has_eval else None,
        data_collator=prepared.collator,
        processing_class=prepared.tokenizer,
        compute_metrics=prepared.compute_metrics,
        preprocess_logits_for_metrics=prepared.preprocess_logits,
        callbacks=(
            [
                TelemetryCallback(job_id, prepared.compute_metrics),
                callback,
                *method_callbacks,
                *best_callbacks,
            ]
            + [guard, *tracking_callbacks(job_id, spec)]
            if callback is not None
            # DDP rank > 0: no reporting, but every callback that changes how each rank trains (TelemetryCallback
            # turns on token counting, a collective): ranks that diverge there deadlock.
            else [TelemetryCallback(job_id, prepared.compute_metrics), *method_callbacks, *best_callbacks]
        ),
        optimizers=(optimizer, None),
    )
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        close = getattr(callback, "close", None)
        if close is not None:
            close()
    if callback is None:  # DDP rank > 0: rank 0 writes the adapter and finishes the job
        return
    step = trainer.state.global_step
    if heartbeat.lost.is_set():
        log.warning("job %s: stopped at step %s; another worker holds it now", job_id, step)
        return
    if guard.non_finite is not None:
        raise guard.non_finite
    if callback.cancelled or heartbeat.cancel.is_set():
        _finish(job_id, JobStatus.cancelled, f"cancelled at step {step}", run_token=claim.run_token)
        return
    if resume_from is not None:
        log.info("job %s resumed at step %s and finished at step %s", job_id, resume_step, step)
    final_metrics = _final_metrics(trainer.state.log_history)
    if best is not None:
        final_metrics = _keep_best(job_id, best, step, final_metrics)
    adapter_key = store.job_key(job_id, "adapter")
    adapter_dir = work_dir / "adapter"
    save_adapter(model, method, prepared, adapter_dir, spec, final_metrics)
    store.put_dir(adapter_dir, adapter_key)
    trainable, total = count_parameters(model)
    size, files = _folder_size(adapter_dir)
    with session_scope() as session:
        job = session.get(Job, job_id)
        if not _holds(job, claim.run_token):
            return
        existing = session.exec(select(Adapter).where(Adapter.job_id == job_id)).first()
        if existing is not None:
            session.delete(existing)
            session.flush()
        session.add(
            Adapter(
                job_id=job_id,
                owner_id=job.owner_id if job else None,  # the job's owner owns what it makes
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
                metrics=final_metrics,
            )
        )
        session.commit()
    _finish(job_id, JobStatus.succeeded, "succeeded", run_token=claim.run_token)


def _keep_best(job_id: int, best: BestModelCallback, step: int, final: dict[str, float]) -> dict[str, float]:
    """Restore the best evaluation's weights and say so in the job's events; returns the adapter's metrics."""
    if best.best_step is None:
        return final
    stopped = f"stopped early at step {best.stopped_early_at}; " if best.stopped_early_at else ""
    if not best.keeps_weights:
        message = f"{stopped}kept the final weights: the trainable weights are too large to keep a best copy"
        metrics = final
    elif best.restore(step):
        message = (
            f"{stopped}kept the best evaluation: step {best.best_step} of {step}, "
            f"eval {best.metric} {best.best_value:.4g} (restored its weights)"
        )
        metrics = best.best_metrics
    else:
        message = f"{stopped}the final step {step} was the best (eval {best.metric} {best.best_value:.4g})"
        metrics = best.best_metrics or final
    with session_scope() as session:
        add_event(session, job_id, "best", message)
        job = session.get(Job, job_id)
        if best.restored and best.best_structured and job is not None:
            job.evaluation = {
                **best.best_structured,
                "step": best.best_step,
            }  # the matrix of the kept weights
            session.add(job)
        session.commit()
    return metrics


def save_adapter(
    model: Any,
    method: MethodInfo,
    prepared: Prepared,
    folder: Path,
    spec: JobSpec,
    metrics: dict[str, float] | None = None,
) -> None:
    """Write the adapter folder: the method's files, the tokenizer, studio.json saying how it was made, and a
    model card (README.md, over peft's template) with the held-out ``metrics``."""
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
    with session_scope() as session:
        dataset = session.get(Dataset, spec.dataset_id)
        dataset_name = dataset.name if dataset is not None else None
    write_model_card(folder, spec, method.title, method.saved_as, prepared.labels, metrics, dataset_name)
    if spec.task == "sequence-classification" and method.saved_as == "peft":
        point_at_labelled_base(folder, resolve_base_model(spec.base_model).path, prepared.labels)
