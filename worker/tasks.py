"""Celery tasks: thin wrappers that take ids and call the training engine."""

import logging
from typing import Any

from celery import Task

from app.queue import TRAIN_TASK, get_celery

log = logging.getLogger(__name__)


def _readable(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + " …"


class TrainingTask(Task):
    """Owns the failure transition: the job gets a readable error, its log the traceback."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        from worker.engine import mark_failed

        job_id = int(args[0])
        log.error("job %s failed: %s", job_id, exc)
        mark_failed(job_id, f"{type(exc).__name__}: {_readable(exc)}", str(einfo))


@get_celery().task(name=TRAIN_TASK, base=TrainingTask, bind=True, acks_late=True)
def train_job_task(self: Task, job_id: int) -> None:
    """Train the job with this id."""
    from worker.engine import run_job

    run_job(job_id, worker_name=str(self.request.hostname or "worker"))
