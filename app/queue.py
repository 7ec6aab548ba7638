"""The Celery application, shared by the web app (which only sends tasks by name) and the worker."""

from functools import lru_cache
from typing import Any

from celery import Celery

from app.settings import get_settings

TRAIN_TASK = "peft_studio.train_job"


def make_celery() -> Celery:
    """A Celery app configured from the studio settings."""
    settings = get_settings()
    broker_url = settings.resolved_broker_url
    if broker_url.startswith("sqla+sqlite"):
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("peft_studio", broker=broker_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # Long GPU tasks: take one at a time and acknowledge only when done, so a dead worker's job is redelivered.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=settings.queue_name,
        task_routes={TRAIN_TASK: {"queue": settings.queue_name}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if broker_url.startswith("redis"):
        # Redelivery of unacknowledged long jobs: longer than any job should wait in "reserved" state.
        app.conf.broker_transport_options = {"visibility_timeout": 12 * 3600}
    return app


@lru_cache
def get_celery() -> Celery:
    """The process-wide Celery app (cleared together with the settings in tests)."""
    return make_celery()


def __getattr__(name: str) -> Any:
    # ``celery -A app.queue:celery_app`` and ``from app.queue import celery_app`` get the configured app lazily.
    if name == "celery_app":
        return get_celery()
    raise AttributeError(name)


def enqueue_training(job_id: int) -> str:
    """Send a job to the training queue; returns the Celery task id."""
    result = get_celery().send_task(TRAIN_TASK, args=[job_id], queue=get_settings().queue_name)
    return str(result.id)
