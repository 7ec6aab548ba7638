"""The Celery application, shared by the web app (which only sends tasks by name) and the worker.

Routing: every worker consumes the base queue (``training``); a job that asks for hardware goes to a queue
that only matching workers consume: ``training.cpu``, ``training.gpu``, ``training.gpu.24gb`` (GPUs with at
least 24 GB), ``training.gpu.x2`` / ``training.gpu.80gb.x4`` (at least 2 / 4 GPUs for a DDP job). A worker
computes its queues from its hardware (worker/hardware.py), so no queue list is written by hand.
"""

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from celery import Celery

from app.core.settings import get_settings

if TYPE_CHECKING:
    from app.core.spec import ResourceSettings

TRAIN_TASK = "peft_studio.train_job"


def make_celery() -> Celery:
    """A Celery app configured from the studio settings."""
    settings = get_settings()
    broker_url = settings.resolved_broker_url
    if broker_url.startswith("sqla+sqlite"):
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("peft_studio", broker=broker_url, include=["worker.tasks", "worker.hardware"])
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
    if broker_url.startswith("sqla+"):
        # The embedded broker is polled; kombu's default (1 s) would add up to a second before every job starts.
        # (Its transport options all go to create_engine, so the interval is set on the transport class.)
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = 0.1
    if broker_url.startswith("redis"):
        # Redelivery of unacknowledged long jobs: longer than any job should wait in "reserved" state.
        app.conf.broker_transport_options = {"visibility_timeout": 12 * 3600}
    return app


@lru_cache
def get_celery() -> Celery:
    """The process-wide Celery app (cleared together with the settings in tests)."""
    return make_celery()


def __getattr__(name: str) -> Any:
    # ``celery -A app.core.queue:celery_app`` and ``from app.core.queue import celery_app`` get the configured app lazily.
    if name == "celery_app":
        return get_celery()
    raise AttributeError(name)


GPU_COUNTS = (2, 4, 8)  # DDP jobs ask for this many GPUs at least; one queue per count
# Process memory beyond the estimate (CUDA context, allocator slack), and the headroom kept on the estimate.
GPU_OVERHEAD_BYTES = 2 * 10**9
GPU_HEADROOM = 1.2


def _gpu_count_suffix(count: int) -> str:
    needed = next((n for n in GPU_COUNTS if n >= count), GPU_COUNTS[-1]) if count > 1 else 1
    return f".x{needed}" if needed > 1 else ""


def queue_for(resources: "ResourceSettings | None", base: str | None = None) -> str:
    """The queue a job with these resource needs is sent to."""
    base = base or get_settings().queue_name
    if resources is None:
        return base
    if resources.wants_gpu:
        name = f"{base}.gpu"
        if resources.gpu_class:
            name += f".{resources.gpu_class}"
        return name + _gpu_count_suffix(resources.num_processes)
    if resources.accelerator == "cpu":
        return f"{base}.cpu"
    return base


def worker_queues(gpu_count: int, gpu_memory_bytes: int | None, base: str | None = None) -> list[str]:
    """The queues a worker with this hardware consumes (``gpu_memory_bytes``: its smallest GPU's memory)."""
    from app.core.spec import GPU_CLASS_BYTES

    base = base or get_settings().queue_name
    if gpu_count <= 0:
        return [base, f"{base}.cpu"]
    counts = [""] + [f".x{n}" for n in GPU_COUNTS if n <= gpu_count]
    # Cards report a little less than their label (an 80 GB H100 shows 79.6 GiB = 85.5 GB): 3% slack.
    classes = [""] + [
        f".{name}" for name, size in GPU_CLASS_BYTES.items() if (gpu_memory_bytes or 0) >= size * 0.97
    ]
    return [base] + [f"{base}.gpu{cls}{count}" for cls in classes for count in counts]


def suggest_gpu_class(total_bytes: int) -> str | None:
    """The smallest GPU class whose memory holds an estimated training footprint (None: none is enough)."""
    from app.core.spec import GPU_CLASS_BYTES

    needed = total_bytes * GPU_HEADROOM + GPU_OVERHEAD_BYTES
    return next((name for name, size in GPU_CLASS_BYTES.items() if size >= needed), None)


def _job_resources(job_id: int) -> "ResourceSettings | None":
    """The resources section of a stored job's spec (None when the job is gone)."""
    from app.core.db import session_scope
    from app.core.models import Job
    from app.core.spec import ResourceSettings

    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        return ResourceSettings.model_validate(job.spec.get("resources") or {})


def enqueue_training(
    job_id: int, run_token: str | None = None, resources: "ResourceSettings | None" = None
) -> str:
    """Send a job to the queue its resources route it to (read from the stored job when not given).

    ``run_token`` is the job's token for this delivery: a worker runs the job only while the token still
    matches (so a redelivered or superseded message is skipped).
    """
    if resources is None:
        resources = _job_resources(job_id)
    args: list[object] = [job_id] if run_token is None else [job_id, run_token]
    result = get_celery().send_task(TRAIN_TASK, args=args, queue=queue_for(resources))
    return str(result.id)
