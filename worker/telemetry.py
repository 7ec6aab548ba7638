"""Telemetry for the job page: peak memory and tokens per second added to every logged training step.

``TelemetryCallback`` runs before ``StudioCallback`` (which writes each ``logs`` dict as a metric point) and adds
its keys to the same dict, so they are stored, streamed and charted with the trainer's own values:

- ``peak_rss_mb``: this job's peak resident memory, in MiB: the most the worker process held since the job's
  trainer was built, sampled a few times a second (the process's lifetime peak, ``getrusage``'s ``ru_maxrss``,
  cannot be reset, so on a worker that ran a bigger job before it would report that job's peak);
- ``cuda_peak_mb``: peak memory allocated by torch on the GPU, in MiB, when a GPU is used;
- ``tokens_per_second``: input tokens (padding excluded) trained on per second since the previous log.

Token counting is the Trainer's own (``include_num_input_tokens_seen="non_padding"``, switched on here), so
every log also carries ``num_input_tokens_seen``. At each evaluation this callback also stores the recipe's structured result (the classification confusion matrix) on the
job row (``job.evaluation``), which the job page shows.
"""

import threading
import time
from typing import Any

import psutil  # a dependency of accelerate, which transformers' Trainer needs anyway
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.core.db import session_scope
from app.core.models import Job

MIB = 1024 * 1024


# How often the sampler reads the process's resident memory: often enough to catch a step's peak, cheap enough
# (one /proc read) to go unnoticed.
RSS_SAMPLE_SECONDS = 0.1


class PeakMemorySampler:
    """The peak resident memory of this process from ``start()`` on, kept by a daemon thread that samples RSS."""

    def __init__(self, interval: float = RSS_SAMPLE_SECONDS) -> None:
        self.interval = interval
        self._process = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self._peak = max(self._peak, self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        """Forget any earlier peak and start sampling."""
        self.stop()
        self._peak = 0
        self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (the peak so far stays readable)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None

    def peak_mb(self) -> float:
        """The highest RSS seen since ``start()``, the current one included, in MiB."""
        self._sample()
        return self._peak / MIB


class TelemetryCallback(TrainerCallback):
    """Adds memory and token throughput to training logs, and saves structured eval results on the job."""

    def __init__(self, job_id: int, compute_metrics: Any = None) -> None:
        self.job_id = job_id
        self.compute_metrics = compute_metrics
        self._last_time = time.monotonic()
        self._last_tokens = 0
        self.memory = PeakMemorySampler()

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer counts input tokens only when asked; it reads the flag at every step. Counting gathers
        # across processes, and only the main process has this callback: a multi-process (DDP) job would hang
        # in that gather, so it goes without tokens per second.
        if args.world_size == 1 and args.include_num_input_tokens_seen in ("no", False, None):
            args.include_num_input_tokens_seen = "non_padding"
        # The job's own peak: the model is loaded by now, and whatever an earlier job on this worker held is not.
        self.memory.start()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_time = time.monotonic()
        self._last_tokens = state.num_input_tokens_seen or 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "train_loss" in logs or any(key.startswith("eval_") for key in logs):
            return  # the end-of-training summary, or an evaluation
        # With token counting on, the Trainer adds its running totals (train_runtime, train_tokens_per_second)
        # to every step's log; train_runtime marks the end-of-training summary for the callbacks after us.
        logs.pop("train_runtime", None)
        logs.pop("train_tokens_per_second", None)
        now = time.monotonic()
        tokens = state.num_input_tokens_seen or 0
        if tokens > self._last_tokens and now > self._last_time:
            logs["tokens_per_second"] = (tokens - self._last_tokens) / (now - self._last_time)
        self._last_time, self._last_tokens = now, tokens
        logs["peak_rss_mb"] = self.memory.peak_mb()
        if torch.cuda.is_available():
            logs["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MIB

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.memory.stop()

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        structured = getattr(self.compute_metrics, "last_structured", None)
        if not structured:
            return
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            if job is not None:
                job.evaluation = {**structured, "step": state.global_step}
                session.add(job)
                session.commit()
