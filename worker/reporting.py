"""Reporting a training run: its metric points, progress and heartbeat go to the database, never blocking a step.

``StudioCallback`` is the Trainer callback that turns each logged step into a metric point and progress, and
stops training on a cancel or a lost claim; ``MetricWriter`` is the background thread that writes them in
batches (fenced by the run token) and reads the cancel flag. The job's status is not changed here
(worker/lifecycle.py does that).
"""

import gc
import logging
import queue
import threading
import time
from typing import Any

from sqlalchemy import insert, update
from sqlmodel import col, select
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.core.db import session_scope
from app.core.events import publish
from app.core.models import Job, MetricPoint, MetricRollup, utcnow
from app.core.rollups import RawPoint, RollupBuilder
from app.core.settings import get_settings

log = logging.getLogger(__name__)


class MetricWriter:
    """Writes a job's metric points and progress to the database on a background thread, in batches.

        The training loop only puts items on a bounded queue (it blocks only when the writer is that far behind,
        so nothing is ever dropped); the thread writes whatever has queued up in one transaction, publishes the
        news for live streams (Redis pub/sub when the broker is Redis) and, every ``cancel_poll`` seconds, writes
        the heartbeat and reads the job's cancel flag. ``close`` writes everything still queued, in order. With the
    points it writes the roll-up blocks they complete (app/core/rollups.py), which long charts read instead.

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
        self._rollups = RollupBuilder()  # per-block summaries for charts (app/core/rollups.py)
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
            builder: RollupBuilder | None = None
            if rows:
                # The points get their ids here; the blocks they complete are written in the same transaction
                # (a copy of the builder is kept only once it commits, so a failed write is fed again).
                session.flush()
                last_id = rows[
                    -1
                ].id  # read now: after the commit it would cost a SELECT (expired attributes)
                builder = self._rollups.copy()
                blocks = builder.add(
                    RawPoint(int(row.id or 0), row.step, row.split, row.values) for row in rows
                )
                if blocks:
                    session.execute(insert(MetricRollup), [block.row(self.job_id) for block in blocks])
            session.commit()
            if builder is not None:
                self._rollups = builder
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
