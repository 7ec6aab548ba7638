"""The worker's entry point for one training job: ``run_job`` claims it, trains it, and cleans up.

It composes the three parts: worker/lifecycle.py (claim, fail), worker/training.py (the training run, which
reports through worker/reporting.py) and worker/distributed.py (DDP ranks under torchrun when the job asks for
more than one process).
"""

import logging
import traceback

import torch

from app.core.models import JobStatus
from app.core.settings import get_settings
from app.core.storage import get_store
from worker.distributed import launch as launch_distributed
from worker.downloads import download_for_job
from worker.failures import explain
from worker.lifecycle import JobCancelled, finish_job, mark_failed, start_job
from worker.resilience import Heartbeat, free_memory, remove_dir
from worker.training import train

log = logging.getLogger(__name__)


def run_job(job_id: int, worker_name: str = "worker", run_token: str | None = None) -> None:
    """Train one job end to end and register its adapter; failures propagate to the task's on_failure.

    The job is claimed with ``run_token`` (skipped when it no longer matches); a base model that is a Hub id
    not cached yet is downloaded first (worker/downloads.py), then a job with checkpoints resumes from the
    newest. Whatever happens, the heartbeat stops and memory is given back.
    """
    try:
        claim = start_job(job_id, worker_name, run_token)
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
        if not download_for_job(job_id, claim.spec.base_model, worker_name):
            message = "cancelled while downloading its base model"
            finish_job(job_id, JobStatus.cancelled, message, run_token=claim.run_token)
            return
        if claim.spec.resources.num_processes > 1:
            # Scale out: DDP ranks under torchrun train the job; this process watches them (worker/distributed.py).
            launch_distributed(job_id, claim, work_dir, heartbeat)
        else:
            train(job_id, claim, store, work_dir, heartbeat)
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
