"""What keeps a job alive and resumable in the worker: heartbeat, run-token claim, checkpoints, NaN stop.

``run_job`` (worker/engine.py) claims a job with its run token, starts a ``Heartbeat`` thread, adds a
``ResilienceCallback`` to the Trainer and, when the job has a checkpoint, resumes from it.
"""

import gc
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlmodel import col, delete, func, select
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.core.db import session_scope
from app.core.models import Job, JobStatus, MetricPoint, MetricRollup, utcnow
from app.core.settings import get_settings
from app.core.storage import ArtifactStore
from app.services import checkpoints
from app.services.jobs import add_event
from worker.failures import NonFiniteLoss

log = logging.getLogger(__name__)


class Heartbeat:
    """A thread that writes the job's heartbeat every ``heartbeat_seconds``, whatever a step costs.

    The write is conditional on the run token: when it matches no row, the job was requeued (or finished)
    by someone else and ``lost`` is set, so the training loop stops without touching the job again. The
    thread also notices a cancel request (``cancel``).
    """

    def __init__(self, job_id: int, run_token: str, interval: float | None = None) -> None:
        self.job_id = job_id
        self.run_token = run_token
        self.interval = interval or get_settings().heartbeat_seconds
        self.lost = threading.Event()
        self.cancel = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-job-{job_id}", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def beat(self) -> None:
        """One heartbeat (also called once right away by ``start``'s thread)."""
        with session_scope() as session:
            result = session.execute(
                update(Job)
                .where(
                    col(Job.id) == self.job_id,
                    col(Job.status) == JobStatus.running,
                    col(Job.run_token) == self.run_token,
                )
                .values(heartbeat_at=utcnow())
            )
            session.commit()
            if result.rowcount != 1:  # type: ignore[attr-defined]
                self.lost.set()
                return
            job = session.get(Job, self.job_id)
            if job is not None and job.cancel_requested:
                self.cancel.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as error:  # a database hiccup: try again next beat
                log.warning("job %s: heartbeat failed: %s", self.job_id, error)
            if self.lost.is_set():
                log.warning("job %s: this worker no longer holds the job; stopping", self.job_id)
                return
            self._stop.wait(self.interval)


class ResilienceCallback(TrainerCallback):
    """Stops training when the claim is lost, a cancel is seen, or the loss is NaN/inf; saves checkpoints.

    Before a checkpoint is recorded, every point logged up to it must be in the database (the studio callback
    writes them from a background thread), so a crash right after the checkpoint loses no step of the series.
    """

    def __init__(
        self,
        heartbeat: Heartbeat,
        on_checkpoint: Callable[[Path, TrainerState], None] | None,
        job_id: int | None = None,
    ) -> None:
        self.heartbeat = heartbeat
        self.on_checkpoint = on_checkpoint
        self.job_id = job_id
        self.non_finite: NonFiniteLoss | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.heartbeat.lost.is_set():
            control.should_training_stop = True
            control.should_save = False  # the job belongs to someone else now
        elif self.heartbeat.cancel.is_set():
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
        loss = logs.get("loss", logs.get("eval_loss"))
        if isinstance(loss, int | float) and not math.isfinite(loss) and self.non_finite is None:
            learning_rate = logs.get("learning_rate")
            self.non_finite = NonFiniteLoss(state.global_step, float(loss), learning_rate)
            control.should_training_stop = True
            control.should_save = False  # never checkpoint NaN weights
            control.should_evaluate = False

    def _wait_for_points(self, state: TrainerState, timeout: float = 10.0) -> None:
        """Wait until the database holds a point for every log entry up to this step (log_history also
        holds the entries of earlier runs of a resumed job, whose points were kept)."""
        if self.job_id is None:
            return
        step = state.global_step
        expected = sum(1 for e in state.log_history if e.get("step", 0) <= step and not _is_summary(e))
        deadline = time.monotonic() + timeout
        while True:
            with session_scope() as session:
                written = session.exec(
                    select(func.count())
                    .select_from(MetricPoint)
                    .where(col(MetricPoint.job_id) == self.job_id, col(MetricPoint.step) <= step)
                ).one()
            if written >= expected:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "job %s: %d of %d points up to step %d written", self.job_id, written, expected, step
                )
                return
            time.sleep(0.05)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.on_checkpoint is None or self.heartbeat.lost.is_set() or self.non_finite is not None:
            return
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        self._wait_for_points(state)
        self.on_checkpoint(folder, state)


def _is_summary(entry: dict[str, Any]) -> bool:
    """The end-of-training summary (``train_loss``, ``train_runtime``...), not a logged step."""
    return "train_loss" in entry


def checkpoint_metrics(log_history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The newest train loss (and learning rate) and eval metrics logged at or before ``step``."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step", 0) > step or _is_summary(entry):
            continue
        for key, value in entry.items():
            if key in ("step", "epoch") or not isinstance(value, int | float):
                continue
            if key.startswith("eval_"):
                metrics[key] = float(value)
            elif key in ("loss", "learning_rate", "grad_norm"):
                metrics[key] = float(value)
    return metrics


def prepare_resume(job_id: int, store: ArtifactStore, work_dir: Path) -> tuple[Path | None, int]:
    """Fetch the job's newest checkpoint into ``work_dir`` and forget the metric points after it.

    Returns the local checkpoint folder (None: train from the start) and its step. Points logged after the
    checkpoint were produced by a run that did not survive; the resumed run logs those steps again, so the
    series stays continuous with no step twice.
    """
    with session_scope() as session:
        latest = checkpoints.latest_checkpoint(session, job_id)
        step = latest.step if latest is not None else 0
        local: Path | None = None
        if latest is not None:
            try:
                local = store.get_dir(latest.storage_key, work_dir / f"checkpoint-{latest.step}")
            except FileNotFoundError:
                add_event(
                    session,
                    job_id,
                    "warning",
                    f"the checkpoint at step {latest.step} is missing from the artifact store; starting over",
                )
                checkpoints.delete_all(session, job_id)
                local, step = None, 0
        first_removed = session.exec(
            select(func.min(MetricPoint.id)).where(
                col(MetricPoint.job_id) == job_id, col(MetricPoint.step) > step
            )
        ).one()
        if first_removed is not None:  # the roll-up blocks that summarise a removed point go with it
            session.execute(
                delete(MetricRollup).where(
                    col(MetricRollup.job_id) == job_id, col(MetricRollup.last_id) >= first_removed
                )
            )
        removed = session.execute(
            delete(MetricPoint).where(col(MetricPoint.job_id) == job_id, col(MetricPoint.step) > step)
        ).rowcount  # type: ignore[attr-defined]
        checkpoints.delete_after(session, job_id, step)
        job = session.get(Job, job_id)
        if job is not None:
            job.current_step = step
            job.progress = min(1.0, step / job.total_steps) if job.total_steps else 0.0
            session.add(job)
        if local is not None:
            add_event(
                session,
                job_id,
                "resume",
                f"resuming from the checkpoint at step {step}"
                + (f"; {removed} metric point(s) logged after it are replaced" if removed else ""),
            )
        elif removed:
            add_event(session, job_id, "resume", "no checkpoint yet: training starts over")
        session.commit()
    return local, step


def free_memory() -> None:
    """Give memory back after a job: Python garbage, and the CUDA cache on a GPU."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def remove_dir(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def known_points(job_id: int) -> list[tuple[int, str]]:
    """(step, split) of a job's metric points in id order (tests and the trial script use it)."""
    with session_scope() as session:
        rows = session.exec(
            select(MetricPoint.step, MetricPoint.split)
            .where(MetricPoint.job_id == job_id)
            .order_by(col(MetricPoint.id))
        ).all()
        return [(int(step), str(split)) for step, split in rows]


TRAINABLE_FILE = "studio_trainable.safetensors"


def save_trainable(model: Any, folder: Path, method: Any = None) -> None:
    """Every trainable tensor by its name in the built model: what a resumed run loads back, for any method;
    plus the method's own training state where its ``MethodInfo`` has a checkpoint-state hook (AdaLoRA)."""
    from safetensors.torch import save_file

    from worker.methods._common import checkpoint_state

    tensors = {
        name: param.detach().to("cpu").clone().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    save_file(tensors, str(folder / TRAINABLE_FILE))
    hook = checkpoint_state(method)
    if hook is not None:
        hook.save(model, folder)


def load_trainable(model: Any, folder: Path, method: Any = None) -> None:
    """Put a checkpoint's trainable tensors (and the method's checkpoint state, if it has a hook) into a
    freshly built model, refusing any name mismatch.

    The method is applied once, to a fresh base, by the build; here nothing is injected (peft's
    ``load_adapter`` would wrap matching layers again: the "double LoRA" of resumed runs).
    """
    from safetensors.torch import load_file

    from worker.methods._common import checkpoint_state

    path = folder / TRAINABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {folder.name} has no {TRAINABLE_FILE}; it cannot be resumed")
    state = load_file(str(path))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - trainable)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {folder.name} does not fit the rebuilt model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    with torch_no_grad():
        parameters = dict(model.named_parameters())
        for name, tensor in state.items():
            parameters[name].copy_(tensor.to(parameters[name].device, parameters[name].dtype))
    hook = checkpoint_state(method)
    if hook is not None:
        hook.load(model, folder)


def torch_no_grad() -> Any:
    import torch

    return torch.no_grad()


def resumable_trainer_class(base: type, method: Any = None) -> Any:
    """A Trainer class (``base``) resuming weights, and the method's checkpoint state, with ``load_trainable``
    (optimizer, scheduler, RNG and data position are restored by Trainer itself from the same folder)."""

    class ResumableTrainer(base):  # type: ignore[valid-type,misc]
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            load_trainable(model if model is not None else self.model, Path(resume_from_checkpoint), method)

    return ResumableTrainer
