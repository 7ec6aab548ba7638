"""Celery tasks: thin wrappers that take ids and call the training entry point; and the worker's start-up duties.

A worker started by ``peft-studio serve`` must not outlive it (an orphan would keep taking jobs beside the
next serve's worker): serve asks the kernel to SIGKILL it when serve dies (``PR_SET_PDEATHSIG``, see
app/supervisor.py) and names its pid in ``PEFT_STUDIO_SUPERVISED_BY_PID``; the watchdog below is the fallback
where that is not available: it exits as soon as the worker's parent is no longer that process.
"""

import logging
import os
import threading
from typing import Any

from celery import Task
from celery.signals import worker_init, worker_ready

from app.core.queue import TRAIN_TASK, get_celery
from app.core.settings import get_settings
from app.services.evaluations import EVALUATE_TASK
from app.services.model_downloads import DOWNLOAD_TASK

log = logging.getLogger(__name__)

WATCHDOG_SECONDS = 1.0
EXIT_PARENT_GONE = 70


class TrainingTask(Task):
    """Owns the failure transition: the job gets an explanation, its log the traceback."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        from worker.failures import explain
        from worker.lifecycle import mark_failed

        job_id = int(args[0])
        token = args[1] if len(args) > 1 else kwargs.get("run_token")
        log.error("job %s failed: %s", job_id, exc)
        mark_failed(job_id, explain(exc), str(einfo), run_token=token)


@get_celery().task(name=TRAIN_TASK, base=TrainingTask, bind=True, acks_late=True)
def train_job_task(self: Task, job_id: int, run_token: str | None = None) -> None:
    """Train the job with this id (when ``run_token`` still matches the job's: otherwise it is skipped)."""
    from worker.engine import run_job

    run_job(job_id, worker_name=str(self.request.hostname or "worker"), run_token=run_token)


class EvaluationTask(Task):
    """Owns the failure transition of an evaluation: a failure the run did not record is recorded here."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        from worker.evaluation import describe_failure, mark_failed

        evaluation_id = int(args[0]) if args else int(kwargs["evaluation_id"])
        log.error("evaluation %s failed: %s", evaluation_id, exc)
        mark_failed(evaluation_id, describe_failure(exc))


@get_celery().task(name=EVALUATE_TASK, base=EvaluationTask, bind=True, acks_late=True)
def evaluate_adapter_task(self: Task, evaluation_id: int) -> None:
    """Run the evaluation with this id (skipped when it is finished or gone)."""
    from worker.evaluation import run_evaluation

    run_evaluation(evaluation_id, worker_name=str(self.request.hostname or "worker"))


@get_celery().task(name=DOWNLOAD_TASK, bind=True, acks_late=True)
def download_model_task(self: Task, download_id: int) -> None:
    """Fetch the Hub model of this download into the shared Hub cache (worker/downloads.py)."""
    from worker.downloads import run_download

    run_download(download_id, worker_name=str(self.request.hostname or "worker"))


def _recover(hostname: str) -> None:
    from app.services.recovery import reap, recover_orphans

    try:
        if hostname:
            recover_orphans(hostname)
        reap()
    except Exception:  # the worker must run even when recovery cannot run now; the web app retries
        log.exception("recovery at worker start failed")


@worker_ready.connect
def _recover_on_start(sender: Any = None, **_: Any) -> None:
    """A starting worker requeues jobs whose holder stopped heartbeating (stale ones, and its own name's).

    In a thread: watching a same-named job's heartbeat takes a few heartbeat intervals, and the worker
    should take new jobs meanwhile.
    """
    hostname = str(getattr(sender, "hostname", "") or "")
    threading.Thread(target=_recover, args=(hostname,), name="recover-on-start", daemon=True).start()


def watch_parent(parent_pid: int, interval: float = WATCHDOG_SECONDS) -> threading.Thread:
    """Start a thread that ends this process when its parent is no longer ``parent_pid``."""

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            if os.getppid() != parent_pid:
                log.error("the studio process %s that started this worker is gone; exiting", parent_pid)
                _mark_offline()
                os._exit(EXIT_PARENT_GONE)

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def _mark_offline() -> None:
    try:
        from worker.hardware import _on_shutdown

        _on_shutdown()
    except Exception:  # exiting matters more than the workers page
        log.exception("could not mark this worker offline")


@worker_init.connect
def _watch_supervisor(**_: Any) -> None:
    """When serve started this worker, exit with it (see the module docstring)."""
    parent = get_settings().supervised_by_pid
    if parent:
        if os.getppid() != parent:
            log.error("the studio process %s that started this worker is already gone; exiting", parent)
            os._exit(EXIT_PARENT_GONE)
        watch_parent(parent)
