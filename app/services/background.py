"""The web app's background duties (the stale-job reaper and the webhook dispatcher) in one process, not in each.

``peft-studio serve --web-workers N`` runs N uvicorn processes of the same app, and every one runs the app's
lifespan. The duties need to run once: the reaper would otherwise look for vanished workers N times per
interval and the dispatcher poll N times (both are safe when doubled, by their conditional updates, but it is
wasted work and noise). Each web process tries to take an exclusive lock on a file in the data folder
(``flock``, released by the kernel when its holder exits, even on ``kill -9``); the one that holds it runs the
duties, the others try again every ``RETRY_SECONDS``, so when the holder dies another process takes over.

Scope: the processes that share a data folder (one host). Web processes on several hosts, each with its own data
folder, each elect their own; that is still safe (see above), or set ``PEFT_STUDIO_REAPER_INTERVAL_SECONDS=0``
and ``PEFT_STUDIO_WEBHOOK_POLL_SECONDS=0`` on all hosts but one ([scale-out](../../docs/scale-out.md)).
"""

import asyncio
import fcntl
import logging
import os
from contextlib import suppress
from pathlib import Path
from typing import IO

from app.core.settings import get_settings
from app.services import webhooks
from app.services.recovery import start_reaper

log = logging.getLogger("peft_studio.background")

LOCK_NAME = "web-background.lock"
RETRY_SECONDS = 5.0


def try_lock(path: Path) -> IO[str] | None:
    """An open file holding an exclusive ``flock`` on ``path``, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class BackgroundDuties:
    """Holds the lock (or keeps trying to) and, while held, the reaper task and the dispatcher thread."""

    def __init__(self, lock_path: Path | None = None) -> None:
        self.lock_path = lock_path or get_settings().resolved_data_dir / LOCK_NAME
        self._lock: IO[str] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._dispatcher: webhooks.Dispatcher | None = None
        self._waiter: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        """Whether this process runs the duties."""
        return self._lock is not None

    def _take(self) -> bool:
        self._lock = try_lock(self.lock_path)
        if self._lock is None:
            return False
        log.info(
            "background duties (job reaper, webhook dispatcher) run in this web process, pid %s", os.getpid()
        )
        self._reaper = start_reaper()
        self._dispatcher = webhooks.start_dispatcher()
        return True

    async def _wait_for_lock(self) -> None:
        while not self._take():
            await asyncio.sleep(RETRY_SECONDS)

    def start(self) -> None:
        """Run the duties here if no other web process does; otherwise keep trying in the background."""
        if not self._take():
            log.info("background duties run in another web process (lock %s)", self.lock_path)
            self._waiter = asyncio.get_running_loop().create_task(
                self._wait_for_lock(), name="background-lock"
            )

    async def stop(self) -> None:
        """Stop the duties and let another process take them."""
        if self._waiter is not None:
            self._waiter.cancel()
            with suppress(asyncio.CancelledError):
                await self._waiter
        if self._reaper is not None:
            self._reaper.cancel()
        if self._dispatcher is not None:
            await asyncio.to_thread(webhooks.stop_dispatcher, self._dispatcher)
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None
