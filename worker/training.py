"""Trainer assembly and the training run of one claimed job (``train``), on one process or on each DDP rank.

From the job's spec: the datasets, the base model through the task's recipe, the method applied
(``build_trainable``), the ``TrainingArguments`` (``training_arguments``), the callbacks (reporting, resilience,
best weights, telemetry, tracking), then ``Trainer.train``; at the end the adapter folder (``save_adapter``)
and its row. The job's status changes only through worker/lifecycle.py; the entry point that claims the job
and picks one process or DDP is ``run_job`` in worker/engine.py.
"""

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sqlmodel import select
from transformers import Trainer, TrainerState, TrainingArguments, set_seed

from app.core.autoconfig import (
    needs_resolution,
    rescale_cadence,
    resolve_spec,
    resolve_training,
    rule_inputs_for,
)
from app.core.base_models import resolve_base_model
from app.core.db import session_scope
from app.core.models import Adapter, Dataset, Job, JobStatus
from app.core.spec import JobSpec
from app.core.tasks import CLASSIFICATION
from app.services import checkpoints
from app.services.jobs import add_event
from worker.best import BestModelCallback, metric_for
from worker.failures import TargetModulesNotFound, module_names
from worker.lifecycle import Claim, finish_job, holds
from worker.methods import BuildContext, MethodInfo, count_parameters, get_method
from worker.model_card import point_at_labelled_base, write_model_card
from worker.recipes import Prepared, get_recipe
from worker.reporting import StudioCallback
from worker.resilience import (
    Heartbeat,
    ResilienceCallback,
    checkpoint_metrics,
    prepare_resume,
    resumable_trainer_class,
    save_trainable,
)
from worker.speed import (
    GatheredState,
    apply_liger,
    fsdp_arguments,
    gather_state,
    liger_choice,
    save_gathered,
    save_trainable_from,
    sharded_parameters,
    sharded_trainer_class,
    trainable_names,
    trainer_options,
)
from worker.telemetry import TelemetryCallback
from worker.tracking import tracking_callbacks

log = logging.getLogger(__name__)

STUDIO_FILE = "studio.json"


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


def training_arguments(
    spec: JobSpec,
    output_dir: Path,
    has_eval: bool,
    save_steps: int = 0,
    sharding: dict[str, Any] | None = None,
    args_class: Any = None,
    extra: dict[str, Any] | None = None,
) -> TrainingArguments:
    """The Trainer's arguments for a job: its training settings, evaluation and checkpoint cadence, precision,
    the speed settings (worker/speed.py) and, for FSDP, ``sharding``.

    ``args_class`` is a TrainingArguments subclass a task's trainer takes (trl's DPOConfig), with ``extra`` its own
    values (the loss and its settings) over the studio's.
    """
    training = spec.training
    if needs_resolution(training):  # a spec from outside a queued job (a test): the rule without row counts
        training = resolve_training(training, rule_inputs_for(spec, 0, 0)).training
    values: dict[str, Any] = dict(
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
        **trainer_options(spec),  # optimizer, gradient checkpointing, torch.compile (issue 22)
        **(sharding or {}),
    )
    values.update(extra or {})
    built: TrainingArguments = (args_class or TrainingArguments)(**values)
    return built


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


def build_trainable(spec: JobSpec, sharded: bool = False) -> tuple[Prepared, MethodInfo, Any, Any, list[Any]]:
    """Load data and base model through the task's recipe and apply the job's method (``sharded``: for FSDP).

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
    quantization = load_kwargs.get("quantization_config")
    if sharded and quantization is not None and getattr(quantization, "load_in_4bit", False):
        # QLoRA + FSDP: 4-bit weights stored in the compute dtype, so FSDP can shard them with the rest.
        quantization.bnb_4bit_quant_storage = quantization.bnb_4bit_compute_dtype
    prepared = get_recipe(spec.task).prepare(spec, base, train_ds, validation_ds, load_kwargs)
    use_liger, liger_note = liger_choice(spec, prepared.model)
    if use_liger:
        apply_liger(prepared.model)
    prepared.notes.append(liger_note)
    examples = len(prepared.train_dataset) if hasattr(prepared.train_dataset, "__len__") else None
    context = replace(
        context, num_labels=len(prepared.labels) or None, total_steps=total_steps(spec, examples)
    )
    # The method adds random weights next (e.g. LoRA's A matrices): seed them so a job is repeatable.
    set_seed(training.seed)
    if prepared.trainable:  # the recipe continued a saved adapter: training goes on from its weights
        return prepared, method, prepared.model, None, []
    try:
        built = method.build(prepared.model, settings, context)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        if "target module" in str(exc).lower():
            raise TargetModulesNotFound(str(exc), module_names(prepared.model)) from exc
        raise
    optimizer = built.optimizer_factory(built.model) if built.optimizer_factory else None
    return prepared, method, built.model, optimizer, built.callbacks


def train(
    job_id: int,
    claim: Claim,
    store: Any,
    work_dir: Path,
    heartbeat: Heartbeat,
    main_process: bool = True,
    strategy: str = "ddp",
) -> None:
    """Train a claimed job in this process, then save its adapter, register it and finish the job.

    ``main_process`` is False on DDP ranks other than 0 (worker/distributed.py): they only train, while rank 0
    reports metrics, checks for cancel, saves checkpoints and the adapter, and finishes the job. Failures
    propagate to the caller, which fails the job. ``strategy`` fsdp shards the model over the ranks; every
    rank then joins the gathers before each save (worker/speed.py).
    """
    spec = claim.spec
    if needs_resolution(spec.training):
        with session_scope() as session:
            spec, explanation = resolve_spec(session, spec)
            if explanation and main_process:
                add_event(session, job_id, "config", explanation)
                session.commit()
    resume_from, resume_step = prepare_resume(job_id, store, work_dir / "output")
    set_seed(spec.training.seed)  # the new head's random init too: a rerun or resumed run starts the same
    sharded = strategy == "fsdp"
    prepared, method, model, optimizer, method_callbacks = build_trainable(spec, sharded)
    spec = packed_cadence(resolved(spec), prepared)
    gathered = GatheredState()  # FSDP: the full weights the last checkpoint gathered
    cut = length_note(prepared.metadata, spec.training.max_length)
    if cut:
        prepared.notes.append(cut)
    reference = prepared.metadata.get("reference")
    if reference:  # preference tuning: say what the reference model is (and what it costs)
        prepared.notes.append(f"{prepared.metadata.get('preference_loss')}: reference model {reference}")
    if main_process and prepared.notes:
        with session_scope() as session:
            for note in prepared.notes:
                add_event(session, job_id, "config", note)
            session.commit()
    has_eval = bool(prepared.eval_dataset)
    examples = len(prepared.train_dataset) if hasattr(prepared.train_dataset, "__len__") else None
    save_steps = save_every(spec, total_steps(spec, examples))
    # Scale out (DDP): only rank 0 reports metrics, checks for cancel and saves; other ranks only train.
    callback = (
        StudioCallback(job_id, spec.training.batch_size, claim.run_token, claim.attempt, lost=heartbeat.lost)
        if main_process
        else None
    )

    def store_checkpoint(folder: Path, state: TrainerState) -> None:
        if sharded:
            assert gathered.state is not None, "the Trainer's save gathers the weights before on_save"
            save_trainable_from(gathered.state, trainable_names(model), folder)
        else:
            save_trainable(model, folder, method)
        save_adapter(
            model, method, prepared, folder / checkpoints.ADAPTER_FOLDER, spec, state_dict=gathered.state
        )
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
    # FSDP: each rank snapshots and restores its own shards of them (the parameters are DTensors), every rank
    # before the final gather.
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
    # training.Trainer: benchmarks swap it for a timed one; a task may name its own (trl's DPOTrainer, ...).
    trainer_class = resumable_trainer_class(prepared.trainer_class or Trainer, method)
    if sharded:
        trainer_class = sharded_trainer_class(trainer_class, gathered, on_cpu=not torch.cuda.is_available())
    metric_kwargs: dict[str, Any] = (
        {}
        if prepared.trainer_class is not None
        else {
            "compute_metrics": prepared.compute_metrics,
            "preprocess_logits_for_metrics": prepared.preprocess_logits,
        }
    )
    trainer = trainer_class(
        model=model,
        args=training_arguments(
            spec,
            work_dir / "output",
            has_eval,
            save_steps,
            fsdp_arguments(model) if sharded else None,
            prepared.args_class,
            prepared.args_extra,
        ),
        train_dataset=prepared.train_dataset,
        eval_dataset=prepared.eval_dataset if has_eval else None,
        data_collator=prepared.collator,
        processing_class=prepared.tokenizer,
        **metric_kwargs,
        **prepared.trainer_kwargs,
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
    if prepared.after_trainer is not None:
        prepared.after_trainer(trainer)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        close = getattr(callback, "close", None)
        if close is not None:
            close()
    if sharded:
        shards = sharded_parameters(model)
        if not shards:  # accelerate fell back to replicating: the memory the job was sized for is not there
            raise RuntimeError(
                "resources.strategy fsdp: the model was not sharded (no parameter is a DTensor)"
            )
        if main_process:
            with session_scope() as session:
                message = (
                    f"fsdp: {shards} parameter tensors were sharded over the ranks (FSDP2 through accelerate)"
                )
                add_event(session, job_id, "config", message)
                session.commit()
    if sharded and best is not None:
        # every rank puts its own shards of the best evaluation's weights back before the gather reads them
        best.restore(trainer.state.global_step)
    final_state = gather_state(trainer.model_wrapped) if sharded else None  # every rank joins
    if callback is None:  # DDP rank > 0: rank 0 writes the adapter and finishes the job
        return
    step = trainer.state.global_step
    if heartbeat.lost.is_set():
        log.warning("job %s: stopped at step %s; another worker holds it now", job_id, step)
        return
    if guard.non_finite is not None:
        raise guard.non_finite
    if callback.cancelled or heartbeat.cancel.is_set():
        finish_job(job_id, JobStatus.cancelled, f"cancelled at step {step}", run_token=claim.run_token)
        return
    if resume_from is not None:
        log.info("job %s resumed at step %s and finished at step %s", job_id, resume_step, step)
    final_metrics = _final_metrics(trainer.state.log_history)
    if best is not None:
        final_metrics = _keep_best(job_id, best, step, final_metrics)
    adapter_key = store.job_key(job_id, "adapter")
    adapter_dir = work_dir / "adapter"
    save_adapter(model, method, prepared, adapter_dir, spec, final_metrics, state_dict=final_state)
    store.put_dir(adapter_dir, adapter_key)
    trainable, total = count_parameters(model)
    size, files = _folder_size(adapter_dir)
    with session_scope() as session:
        job = session.get(Job, job_id)
        if not holds(job, claim.run_token):
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
    finish_job(job_id, JobStatus.succeeded, "succeeded", run_token=claim.run_token)


def packed_cadence(spec: JobSpec, prepared: Prepared) -> JobSpec:
    """When ``packing`` auto packed rows (a GPU worker), keep the auto rule's evaluation and logging counts.

    The rule counted steps from examples at submission; an epoch of rows has fewer, fuller steps. The epochs stay
    (the same passes over the data); the packing note in the job's events says how many steps that is now.
    """
    meta = prepared.metadata
    if meta.get("packing") != "rows" or not meta.get("packing_auto"):
        return spec
    examples, rows = int(meta.get("train_examples") or 0), int(meta.get("train_sequences") or 0)
    before, after = total_steps(spec, examples), total_steps(spec, rows)
    if before is None or after is None:
        return spec
    training, changed = rescale_cadence(spec.training, before, after)
    note = f"{examples} examples in {rows} rows: {after} steps ({before} unpacked)"
    note += f"; {changed} (auto, scaled to keep as many)" if changed else ""
    for index, existing in enumerate(prepared.notes):
        if existing and existing.startswith("packing auto: rows"):
            prepared.notes[index] = f"{existing}: {note}"
    return spec.model_copy(update={"training": training})


def length_note(metadata: dict[str, Any], max_length: int) -> str | None:
    """What ``training.max_length`` did to the data (examples skipped, examples cut), for the job's events."""
    dropped, truncated = (
        int(metadata.get("dropped_examples") or 0),
        int(metadata.get("truncated_examples") or 0),
    )
    if not dropped and not truncated:
        return None
    total = int(metadata.get("train_examples") or 0) + int(metadata.get("eval_examples") or 0) + dropped
    parts = []
    if dropped:
        parts.append(
            f"{dropped} of {total} examples skipped (nothing to learn within it: the prompt fills it)"
        )
    if truncated:
        parts.append(f"{truncated} cut at it")
    return (
        f"data: training.max_length {max_length}: {' and '.join(parts)}; raise it to train on them whole "
        "(the preview shows where the cut falls)"
    )


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
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write the adapter folder: the method's files, the tokenizer, studio.json saying how it was made, and a
    model card (README.md, over peft's template) with the held-out ``metrics``. ``state_dict``: the full
    weights gathered from an FSDP-sharded model (the model's own tensors are shards)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if state_dict is not None:
        save_gathered(model, str(folder), state_dict)
    else:
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
    if spec.task == CLASSIFICATION and method.saved_as == "peft":
        point_at_labelled_base(folder, resolve_base_model(spec.base_model).path, prepared.labels)
