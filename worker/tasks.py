"""Celery tasks: thin wrappers that take ids and call the training engine."""

import logging
from typing import Any

from celery import Task
from celery.signals import worker_ready

from app.queue import TRAIN_TASK, get_celery

log = logging.getLogger(__name__)


class TrainingTask(Task):
    """Owns the failure transition: the job gets an explanation, its log the traceback."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        from worker.engine import mark_failed
        from worker.failures import explain

        job_id = int(args[0])
        token = args[1] if len(args) > 1 else kwargs.get("run_token")
        log.error("job %s failed: %s", job_id, exc)
        mark_failed(job_id, explain(exc), str(einfo), run_token=token)


@get_celery().task(name=TRAIN_TASK, base=TrainingTask, bind=True, acks_late=True)
def train_job_task(self: Task, job_id: int, run_token: str | None = None) -> None:
    """Train the job with this id (when ``run_token`` still matches the job's: otherwise it is skipped)."""
    from worker.engine import run_job

    run_job(job_id, worker_name=str(self.request.hostname or "worker"), run_token=run_token)


@worker_ready.connect
def _recover_on_start(sender: Any = None, **_: Any) -> None:
    """A starting worker requeues the jobs its earlier self (same name) left running, and any stale ones."""
    from app.services.recovery import reap, recover_orphans

    hostname = str(getattr(sender, "hostname", "") or "")
    try:
        if hostname:
            recover_orphans(hostname)
        reap()
    except Exception:  # the worker must start even when recovery cannot run now; the web app retries
        log.exception("recovery at worker start failed")
