"""``peft-studio serve``'s training workers: started, watched, restarted when they die, and tied to serve's life.

- **Restart with back-off.** A thread polls each worker process (``Popen.poll`` also reaps it, so a dead one
  never stays ``<defunct>``) and starts a new one after a wait that begins at 1 s and doubles up to 60 s;
  a worker that stayed up for a minute resets its slot's wait.
- **Dies with serve.** Each worker is started with ``PR_SET_PDEATHSIG`` (Linux; set in the child between
  fork and exec), so the kernel SIGKILLs it when serve dies, even by ``kill -9``. The child checks right after
  that its parent is still serve (closing the race where serve died before the call); the worker's watchdog
  thread (worker/tasks.py, told serve's pid through ``PEFT_STUDIO_SUPERVISED_BY_PID``) is the fallback where
  the call is not available. A killed worker's job is requeued by the usual heartbeat rules.
- **Unique names.** Every start gets a new Celery name, ``worker<slot>-<random>@<host>``, so a restarted serve
  never runs two workers under one name (the workers page would merge them, and recovery by name could take a
  job from a worker that still trains it).

Hand-written because the process managers that could do this (supervisord, systemd, circus) are separate
daemons with their own configuration, and serve is the one-command embedded default.
"""

import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("peft_studio.supervisor")

PR_SET_PDEATHSIG = 1
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0
HEALTHY_AFTER_SECONDS = 60.0
POLL_SECONDS = 0.5
STOP_TIMEOUT_SECONDS = 30.0


def next_backoff(current: float) -> float:
    """The wait after another quick death: twice the last one, at most a minute."""
    return min(max(current, FIRST_BACKOFF_SECONDS / 2) * 2, MAX_BACKOFF_SECONDS)


def die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when ``parent_pid`` dies (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here, in the parent: the child only calls it
    prctl = libc.prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # serve died before the call took effect
            os._exit(1)

    return preexec


def unique_worker_name(slot: int) -> str:
    """A Celery worker name no other start uses: ``worker<slot>-<6 hex>@%h`` (Celery fills in the host)."""
    return f"worker{slot}-{secrets.token_hex(3)}@%h"


@dataclass
class Slot:
    """One worker position: its current process, when it started, and the wait before its next restart."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF_SECONDS
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class WorkerSupervisor:
    """Starts ``count`` workers and keeps them running until :meth:`stop`."""

    count: int
    command: Callable[[str], list[str]]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    clock: Callable[[], float] = time.monotonic
    slots: list[Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [Slot(number) for number in range(1, max(self.count, 0) + 1)]
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> "WorkerSupervisor":
        """Start the workers and the watching thread (which also spawns: see :meth:`_run`)."""
        if self.slots:
            self._thread.start()
            self._started.wait(timeout=30)
        return self

    def _spawn(self, slot: Slot) -> None:
        env = {**self.env, "PEFT_STUDIO_SUPERVISED_BY_PID": str(os.getpid())}
        slot.process = subprocess.Popen(
            self.command(unique_worker_name(slot.number)), env=env, preexec_fn=die_with_parent(os.getpid())
        )
        slot.started = self.clock()
        slot.restart_at = None

    def check(self) -> None:
        """One pass: reap dead workers, schedule their restarts, start those that are due."""
        now = self.clock()
        for slot in self.slots:
            process = slot.process
            if process is not None and process.poll() is not None:  # poll() reaps it
                lived = now - slot.started
                if lived >= HEALTHY_AFTER_SECONDS:
                    slot.backoff = FIRST_BACKOFF_SECONDS
                wait = slot.backoff
                slot.backoff = next_backoff(slot.backoff)
                slot.process, slot.restart_at = None, now + wait
                log.warning(
                    "training worker %s (pid %s) exited with %s after %.0f s; starting another in %.0f s",
                    slot.number,
                    process.pid,
                    process.returncode,
                    lived,
                    wait,
                )
            elif process is not None and now - slot.started >= HEALTHY_AFTER_SECONDS:
                slot.backoff = FIRST_BACKOFF_SECONDS
            if slot.process is None and (slot.restart_at is None or now >= slot.restart_at):
                if slot.restart_at is not None:
                    slot.restarts += 1
                try:
                    self._spawn(slot)
                except OSError as error:  # could not even start (no memory, no executable): back off too
                    log.error("could not start training worker %s: %s", slot.number, error)
                    slot.restart_at = now + slot.backoff
                    slot.backoff = next_backoff(slot.backoff)

    def _run(self) -> None:
        # Every worker is spawned from this thread: PR_SET_PDEATHSIG fires when the *thread* that forked the
        # child ends, so the spawning thread must live as long as its workers do (it never ends on an error).
        while True:
            try:
                self.check()
            except Exception:  # keep supervising: a failed start is retried at the next pass
                log.exception("the worker supervisor failed a pass")
            self._started.set()
            if self._stopping.wait(POLL_SECONDS):
                break
        self._stop_workers()

    def _stop_workers(self) -> None:
        processes = [slot.process for slot in self.slots if slot.process is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def stop(self) -> None:
        """Stop supervising and end the workers (SIGTERM, then SIGKILL after 30 s)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_TIMEOUT_SECONDS + 15)

    def pids(self) -> list[int]:
        """The current workers' process ids."""
        return [slot.process.pid for slot in self.slots if slot.process is not None]
