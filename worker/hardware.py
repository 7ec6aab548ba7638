"""What a worker has (CPUs, memory, GPUs) and its row on the workers page.

Detection asks ``nvidia-smi`` rather than importing torch, so ``peft-studio worker`` and ``serve`` pick their
queues (app/core/queue.py: ``worker_queues``) in milliseconds. The Celery signals below keep a ``Worker`` row per
worker process: registered when it is ready, a heartbeat from a background thread, the job it runs, offline
when it shuts down. Celery imports this module in every worker (``include`` in app/core/queue.py).
"""

import logging
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown
from sqlmodel import select

from app.core.models import Worker, utcnow
from app.core.queue import TRAIN_TASK, worker_queues
from app.core.settings import get_settings

log = logging.getLogger(__name__)


@dataclass
class Gpu:
    """One GPU: its name and memory."""

    name: str
    memory_bytes: int


@dataclass
class Hardware:
    """What one host offers a worker."""

    cpu_count: int
    memory_bytes: int | None
    gpus: list[Gpu] = field(default_factory=list)

    @property
    def gpu_count(self) -> int:
        """How many GPUs the worker may use."""
        return len(self.gpus)

    @property
    def gpu_memory_bytes(self) -> int | None:
        """The smallest GPU's memory (a job must fit on every rank's GPU)."""
        return min((gpu.memory_bytes for gpu in self.gpus), default=None)

    def queues(self, base: str | None = None) -> list[str]:
        """The queues a worker with this hardware consumes."""
        return worker_queues(self.gpu_count, self.gpu_memory_bytes, base)


def _nvidia_gpus() -> list[Gpu]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as problem:
        log.warning("nvidia-smi failed (%s); this worker announces no GPU", problem)
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append(Gpu(name=name.strip(), memory_bytes=int(float(mib)) * 1024 * 1024))
        except ValueError:
            continue
    return gpus


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def detect() -> Hardware:
    """The CPUs, memory and GPUs of this host; ``PEFT_STUDIO_WORKER_GPU_COUNT`` caps (0: hides) the GPUs."""
    gpus = _nvidia_gpus()
    limit = get_settings().worker_gpu_count
    if limit is not None:
        gpus = gpus[:limit]
    return Hardware(cpu_count=os.cpu_count() or 1, memory_bytes=_memory_bytes(), gpus=gpus)


# ---- the worker's row -------------------------------------------------------------------------


class _Registration:
    """The worker row of this process and the thread that keeps its heartbeat."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


_registration = _Registration()


def register(name: str, queues: list[str], hardware: Hardware | None = None) -> None:
    """Write (or refresh) this worker's row and start its heartbeat thread."""
    from app.core.db import session_scope

    hardware = hardware or detect()
    with session_scope() as session:
        row = session.exec(select(Worker).where(Worker.name == name)).first() or Worker(
            name=name, hostname=""
        )
        row.hostname = socket.gethostname()
        row.pid = os.getpid()
        row.queues = queues
        row.cpu_count = hardware.cpu_count
        row.memory_bytes = hardware.memory_bytes
        row.gpu_count = hardware.gpu_count
        row.gpus = [asdict(gpu) for gpu in hardware.gpus]
        row.status = "online"
        row.current_job_id = None
        row.started_at = row.heartbeat_at = utcnow()
        session.add(row)
        session.commit()
    _registration.name = name
    _registration.stop.clear()
    if _registration.thread is None or not _registration.thread.is_alive():
        _registration.thread = threading.Thread(target=_heartbeat_loop, name="worker-heartbeat", daemon=True)
        _registration.thread.start()


def _update(**values: Any) -> None:
    from app.core.db import session_scope

    if _registration.name is None:
        return
    try:
        with session_scope() as session:
            row = session.exec(select(Worker).where(Worker.name == _registration.name)).first()
            if row is None:
                return
            for key, value in values.items():
                setattr(row, key, value)
            row.heartbeat_at = utcnow()
            session.add(row)
            session.commit()
    except Exception as problem:  # noqa: BLE001 - the workers page must never break a training job
        log.warning("could not update worker %s: %s", _registration.name, problem)


def _heartbeat_loop() -> None:
    interval = get_settings().worker_heartbeat_seconds
    while not _registration.stop.wait(interval):
        _update(status="online")


def _consumed_queues(consumer: Any) -> list[str]:
    task_consumer = getattr(consumer, "task_consumer", None)
    names = [queue.name for queue in getattr(task_consumer, "queues", None) or []]
    if not names:
        names = list(getattr(consumer.app.amqp.queues, "consume_from", None) or [])
    return sorted(set(names))


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    name = str(getattr(sender, "hostname", "") or f"worker@{socket.gethostname()}")
    try:
        register(name, _consumed_queues(sender))
    except Exception as problem:  # noqa: BLE001 - a worker without a row still trains
        log.warning("could not register worker %s: %s", name, problem)


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    _registration.stop.set()
    # Wait for a heartbeat already under way, or it could write "online" over the "offline" below.
    if _registration.thread is not None and _registration.thread is not threading.current_thread():
        _registration.thread.join(timeout=5)
    _update(status="offline", current_job_id=None)


@task_prerun.connect
def _on_task_start(sender: Any = None, args: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) == TRAIN_TASK and args:
        _update(current_job_id=int(args[0]), status="online")


@task_postrun.connect
def _on_task_end(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != TRAIN_TASK or _registration.name is None:
        return
    from app.core.db import session_scope

    try:
        with session_scope() as session:
            row = session.exec(select(Worker).where(Worker.name == _registration.name)).first()
            if row is not None:
                row.current_job_id = None
                row.jobs_run += 1
                row.heartbeat_at = utcnow()
                session.add(row)
                session.commit()
    except Exception as problem:  # noqa: BLE001
        log.warning("could not update worker %s: %s", _registration.name, problem)
