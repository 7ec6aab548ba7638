"""Telemetry for the job page: peak memory and tokens per second added to every logged training step.

``TelemetryCallback`` runs before ``StudioCallback`` (which writes each ``logs`` dict as a metric point) and adds
its keys to the same dict, so they are stored, streamed and charted with the trainer's own values:

- ``peak_rss_mb``: the process's peak resident memory (``getrusage``), in MiB;
- ``cuda_peak_mb``: peak memory allocated by torch on the GPU, in MiB, when a GPU is used;
- ``tokens_per_second``: input tokens (padding excluded) trained on per second since the previous log.

Token counting is the Trainer's own (``include_num_input_tokens_seen="non_padding"``, switched on here), so
every log also carries ``num_input_tokens_seen``. At each evaluation this callback also stores the recipe's structured result (the classification confusion matrix) on the
job row (``job.evaluation``), which the job page shows.
"""

import resource
import sys
import time
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.db import session_scope
from app.models import Job

MIB = 1024 * 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


class TelemetryCallback(TrainerCallback):
    """Adds memory and token throughput to training logs, and saves structured eval results on the job."""

    def __init__(self, job_id: int, compute_metrics: Any = None) -> None:
        self.job_id = job_id
        self.compute_metrics = compute_metrics
        self._last_time = time.monotonic()
        self._last_tokens = 0

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer counts input tokens only when asked; it reads the flag at every step. Counting gathers
        # across processes, and only the main process has this callback: a multi-process (DDP) job would hang
        # in that gather, so it goes without tokens per second.
        if args.world_size == 1 and args.include_num_input_tokens_seen in ("no", False, None):
            args.include_num_input_tokens_seen = "non_padding"

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
        logs["peak_rss_mb"] = peak_rss_mb()
        if torch.cuda.is_available():
            logs["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MIB

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
