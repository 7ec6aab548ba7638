"""Live job notifications: a worker says "job N has new metric points", the SSE stream wakes up at once.

The database stays the source of truth: a notification carries only the job id and the newest point id, and
the stream reads the points themselves from the database (so ordering, ``Last-Event-ID`` replay and a
missed message are all handled by the same query). With a Redis broker the notification travels over Redis
pub/sub (channel ``<queue>:job:<id>``); on the embedded SQLite broker there is no cross-process channel and
the stream falls back to polling the database every ``stream_poll_seconds``.
"""

import json
import logging
from functools import lru_cache
from typing import Any

from app.core.settings import get_settings

log = logging.getLogger(__name__)


def redis_url() -> str | None:
    """The Redis URL to publish on: the broker's, when the broker is Redis; otherwise None."""
    url = get_settings().resolved_broker_url
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


def channel(job_id: int) -> str:
    """The pub/sub channel of one job."""
    return f"{get_settings().queue_name}:job:{job_id}"


@lru_cache
def _publisher(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def publish(job_id: int, last_point_id: int | None, kind: str = "metric") -> bool:
    """Tell stream listeners that the job has news; False when there is no Redis or it did not answer.

    Never raises: a lost notification only delays the stream until its next database poll.
    """
    url = redis_url()
    if url is None:
        return False
    try:
        _publisher(url).publish(channel(job_id), json.dumps({"kind": kind, "last_id": last_point_id}))
        return True
    except Exception as error:  # noqa: BLE001 - a notification is best effort by design
        log.warning("could not publish job %s news to Redis: %s", job_id, error)
        return False


class Subscription:
    """An asyncio subscription to one job's channel; ``wait`` returns when news arrives or the timeout ends."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self._client: Any = None
        self._pubsub: Any = None

    async def __aenter__(self) -> "Subscription":
        url = redis_url()
        if url is not None:
            try:
                import redis.asyncio as aioredis

                self._client = aioredis.Redis.from_url(url, socket_connect_timeout=2)
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(channel(self.job_id))
            except Exception as error:  # noqa: BLE001 - fall back to polling
                log.warning("no Redis subscription for job %s (%s); polling instead", self.job_id, error)
                await self._close()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        try:
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
        except Exception:  # noqa: BLE001, S110 - closing a broken connection
            pass

    @property
    def live(self) -> bool:
        """Whether news is pushed (Redis) rather than polled."""
        return self._pubsub is not None

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for news; True when some arrived (all queued messages are drained)."""
        if self._pubsub is None:
            import asyncio

            await asyncio.sleep(timeout)
            return False
        try:
            message = await self._pubsub.get_message(timeout=timeout)
            got = message is not None
            while message is not None:  # drain: one database read covers all of them
                message = await self._pubsub.get_message(timeout=0)
            return got
        except Exception as error:  # noqa: BLE001 - Redis went away: keep streaming by polling
            log.warning("Redis subscription for job %s broke (%s); polling instead", self.job_id, error)
            await self._close()
            return False
