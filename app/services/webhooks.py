"""Webhooks: when a job succeeds, fails or is cancelled, POST a signed JSON event to its owner's URLs.

How events travel (an outbox): the **dispatcher**, a daemon thread in each web process (started with the
app, see ``app/api/webhooks.py``), wakes every ``webhook_poll_seconds`` and

1. finds jobs that reached a final status after a webhook was created and have no delivery row for it yet,
   and writes one (``webhookdelivery``, unique per webhook, job and event type, so two web processes never
   queue the same event twice);
2. claims due deliveries one by one with a conditional UPDATE (so two dispatchers never send the same
   attempt) and POSTs them.

Finding finished jobs by looking at the job table, rather than hooking each place that ends a job, catches
every path at once (the engine's success or cancel, a task's failure, a queued job cancelled in the web app,
a stale job reaped by the resilience sweep) and never touches the training process: a slow or dead receiver
cannot delay training, and events survive restarts of any process because they live in the database.

Signatures: ``X-PeftStudio-Signature: sha256=<hex>``, the HMAC-SHA256 with the webhook's secret of
``<timestamp>.<body>``, where ``X-PeftStudio-Timestamp`` is the Unix time of the attempt (see
:func:`verify_signature`). Retries back off exponentially (``webhook_retry_base_seconds`` × 2^(attempt−1),
at most an hour) up to ``webhook_max_attempts``; the schedule is stored on the row rather than kept by a retry
library, because it must outlive the process that made the attempt.

Addresses (app/core/netguard.py): a URL whose host is or resolves to a loopback, private, link-local or metadata
address is refused when the webhook is created and again at every attempt (each redirect too), and the request
goes to the address that was checked. The delivery log shows status codes and a generic error class, never
the receiver's answer.
"""

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import and_, exists, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.core.db import session_scope
from app.core.errors import InvalidSpec, NotFound
from app.core.models import Adapter, Job, JobStatus, Webhook, WebhookDelivery, utcnow
from app.core.netguard import BlockedAddress, Unresolvable, check_user_url, pinned_request
from app.core.settings import get_settings

log = logging.getLogger(__name__)

JOB_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
PING = "ping"
SIGNATURE_HEADER = "X-PeftStudio-Signature"
TIMESTAMP_HEADER = "X-PeftStudio-Timestamp"
EVENT_HEADER = "X-PeftStudio-Event"
DELIVERY_HEADER = "X-PeftStudio-Delivery"
MAX_BACKOFF_SECONDS = 3600.0
CLAIM_SECONDS = 120.0  # a claimed delivery whose sender died is retried after this
KEEP_ATTEMPTS = 50
_STATUS_EVENTS = {
    JobStatus.succeeded: "job.succeeded",
    JobStatus.failed: "job.failed",
    JobStatus.cancelled: "job.cancelled",
}


# ---- signatures -------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value: ``sha256=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, tolerance_seconds: float | None = 300
) -> bool:
    """What a receiver does: recompute the signature, compare in constant time, refuse stale timestamps."""
    if tolerance_seconds is not None:
        try:
            if abs(time.time() - int(timestamp)) > tolerance_seconds:
                return False
        except ValueError:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


# ---- webhooks ---------------------------------------------------------------------------------


def _check_url(url: str) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an unclosed or invalid [IPv6] host
        valid = False
    if not valid:
        raise InvalidSpec(
            f"The webhook URL {url!r} is not an http(s) URL with a host, e.g. https://example.com/hooks/peft.",
            field="url",
        )
    check_user_url(url, "url", "webhook URL")
    return url


def _check_events(events: Iterable[str] | None) -> list[str]:
    chosen = list(dict.fromkeys(events)) if events is not None else list(JOB_EVENTS)
    unknown = [event for event in chosen if event not in JOB_EVENTS]
    if unknown or not chosen:
        raise InvalidSpec(
            f"Unknown webhook event(s) {', '.join(map(repr, unknown)) or '(none chosen)'}; choose from "
            f"{', '.join(JOB_EVENTS)}.",
            field="events",
        )
    return chosen


def create_webhook(
    session: Session,
    url: str,
    secret: str | None = None,
    events: Iterable[str] | None = None,
    description: str = "",
    owner_id: int | None = None,
) -> Webhook:
    """Register a URL for the owner's job events; a secret is generated when none is given."""
    if secret is not None and len(secret) < 16:
        raise InvalidSpec(
            "The webhook secret must be at least 16 characters (or leave it out to get a generated one).",
            field="secret",
        )
    webhook = Webhook(
        owner_id=owner_id,
        url=_check_url(url),
        secret=secret or f"whsec_{secrets.token_urlsafe(32)}",
        description=description.strip()[:200],
        events=_check_events(events),
    )
    session.add(webhook)
    session.commit()
    session.refresh(webhook)
    return webhook


def list_webhooks(session: Session, owner_id: int | None = None) -> list[Webhook]:
    """Webhooks (of one owner, when given), oldest first."""
    statement = select(Webhook).order_by(col(Webhook.id))
    if owner_id is not None:
        statement = statement.where(Webhook.owner_id == owner_id)
    return list(session.exec(statement).all())


def get_webhook(session: Session, webhook_id: int, owner_id: int | None = None) -> Webhook:
    """One webhook, or NotFound (also for another owner's)."""
    webhook = session.get(Webhook, webhook_id)
    if webhook is None or (owner_id is not None and webhook.owner_id != owner_id):
        raise NotFound(f"Webhook {webhook_id} does not exist.")
    return webhook


def delete_webhook(session: Session, webhook_id: int, owner_id: int | None = None) -> None:
    """Delete a webhook and its delivery log."""
    webhook = get_webhook(session, webhook_id, owner_id)
    for delivery in session.exec(select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)):
        session.delete(delivery)
    session.delete(webhook)
    session.commit()


def list_deliveries(
    session: Session, webhook_id: int, owner_id: int | None = None, limit: int = 100
) -> list[WebhookDelivery]:
    """A webhook's deliveries, newest first."""
    get_webhook(session, webhook_id, owner_id)
    statement = (
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(col(WebhookDelivery.id).desc())
        .limit(limit)
    )
    return list(session.exec(statement).all())


def queue_ping(session: Session, webhook_id: int, owner_id: int | None = None) -> WebhookDelivery:
    """Queue a ``ping`` event to the webhook (to check the receiver and its signature check)."""
    webhook = get_webhook(session, webhook_id, owner_id)
    event_id = f"evt_{uuid.uuid4().hex}"
    delivery = WebhookDelivery(
        webhook_id=webhook_id,
        owner_id=webhook.owner_id,
        event_id=event_id,
        event_type=PING,
        payload={"id": event_id, "type": PING, "created_at": utcnow().isoformat(), "data": {}},
    )
    session.add(delivery)
    session.commit()
    session.refresh(delivery)
    wake_dispatcher()
    return delivery


def redeliver(
    session: Session, webhook_id: int, delivery_id: int, owner_id: int | None = None
) -> WebhookDelivery:
    """Send a delivery again now (e.g. a failed one after the receiver was fixed)."""
    get_webhook(session, webhook_id, owner_id)
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.webhook_id != webhook_id:
        raise NotFound(f"Delivery {delivery_id} of webhook {webhook_id} does not exist.")
    delivery.status = "pending"
    delivery.next_attempt_at = utcnow()
    delivery.locked_until = None
    session.add(delivery)
    session.commit()
    session.refresh(delivery)
    wake_dispatcher()
    return delivery


# ---- events -----------------------------------------------------------------------------------


def job_event_payload(session: Session, job: Job, event_type: str, event_id: str) -> dict[str, Any]:
    """The JSON body of a job event: the job as GET /api/v1/jobs/{id} shows it, its adapter and metrics."""
    from app.services.jobs import job_public
    from app.services.openai_compat.fine_tuning import fine_tuned_model_name

    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).first()
    public = job_public(session, job).model_dump(mode="json")
    assert job.id is not None
    return {
        "id": event_id,
        "type": event_type,
        "created_at": utcnow().isoformat(),
        "data": {
            "job": public,
            "fine_tuning_job_id": f"ftjob-{job.id}",
            "fine_tuned_model": fine_tuned_model_name(session, job) if adapter is not None else None,
            "adapter_id": adapter.id if adapter else None,
            "metrics": adapter.metrics if adapter else {},
        },
    }


def enqueue_finished_jobs(session: Session) -> int:
    """Write a pending delivery for every (active webhook, finished job) pair that has none; returns how many."""
    queued = 0
    for webhook in session.exec(select(Webhook).where(col(Webhook.active).is_(True))).all():
        statuses = [status for status, event in _STATUS_EVENTS.items() if event in webhook.events]
        if not statuses:
            continue
        already = exists().where(
            col(WebhookDelivery.webhook_id) == webhook.id,
            col(WebhookDelivery.job_id) == col(Job.id),
        )
        statement = select(Job).where(
            col(Job.status).in_(statuses),
            col(Job.finished_at).is_not(None),
            col(Job.finished_at) >= webhook.created_at,
            ~already,
        )
        if webhook.owner_id is not None:
            statement = statement.where(Job.owner_id == webhook.owner_id)
        for job in session.exec(statement.order_by(col(Job.id)).limit(200)).all():
            event_type = _STATUS_EVENTS[job.status]
            event_id = f"evt_{uuid.uuid4().hex}"
            session.add(
                WebhookDelivery(
                    webhook_id=webhook.id or 0,
                    owner_id=webhook.owner_id,
                    job_id=job.id,
                    event_id=event_id,
                    event_type=event_type,
                    payload=job_event_payload(session, job, event_type, event_id),
                )
            )
            try:
                session.commit()
                queued += 1
            except IntegrityError:  # another dispatcher queued it first
                session.rollback()
    return queued


def _due_filter(now: datetime) -> Any:
    return or_(
        and_(col(WebhookDelivery.status) == "pending", col(WebhookDelivery.next_attempt_at) <= now),
        and_(col(WebhookDelivery.status) == "sending", col(WebhookDelivery.locked_until) < now),
    )


def _claim(session: Session, delivery_id: int, now: datetime) -> bool:
    result = session.execute(
        update(WebhookDelivery)
        .where(col(WebhookDelivery.id) == delivery_id, _due_filter(now))
        .values(status="sending", locked_until=now + timedelta(seconds=CLAIM_SECONDS))
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0) == 1)


def backoff_seconds(attempts: int) -> float:
    """Wait after the ``attempts``-th failed attempt: base × 2^(attempts−1), at most an hour."""
    base = get_settings().webhook_retry_base_seconds
    return float(min(MAX_BACKOFF_SECONDS, base * 2 ** max(attempts - 1, 0)))


def _post(
    url: str, secret: str, event_type: str, event_id: str, payload: dict[str, Any]
) -> tuple[int | None, str | None]:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "PEFT-Studio-Webhooks/1",
        EVENT_HEADER: event_type,
        DELIVERY_HEADER: event_id,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    try:
        with httpx.Client(timeout=get_settings().webhook_timeout_seconds, follow_redirects=False) as client:
            response = pinned_request(client, "POST", url, content=body, headers=headers)
    except BlockedAddress as exc:
        return None, f"not sent: {exc}"[:500]
    except Unresolvable:
        return None, "not sent: the host does not resolve"
    except (httpx.ConnectError, httpx.ConnectTimeout):
        # One message for refused, unreachable and filtered: the log must not map which ports are open.
        return None, "connection failed"
    except httpx.TimeoutException:
        return None, "timed out waiting for the answer"
    except httpx.HTTPError:
        return None, "the request failed (protocol error)"
    if 200 <= response.status_code < 300:
        return response.status_code, None
    # The status only: the receiver's body is never shown (it could be an internal service's data).
    redirect = " (a redirect that was not followed)" if 300 <= response.status_code < 400 else ""
    return response.status_code, f"HTTP {response.status_code}{redirect}"


def deliver(delivery_id: int) -> str:
    """Make one attempt at a claimed delivery and record it; returns its new status."""
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:
            return "missing"
        webhook = session.get(Webhook, delivery.webhook_id)
        if webhook is None:
            session.delete(delivery)
            session.commit()
            return "missing"
        url, secret = webhook.url, webhook.secret
        event_type, event_id, payload = delivery.event_type, delivery.event_id, dict(delivery.payload)
    started = time.monotonic()
    status_code, error = _post(url, secret, event_type, event_id, payload)
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:
            return "missing"
        now = utcnow()
        delivery.attempts += 1
        delivery.last_status_code = status_code
        delivery.last_error = error
        entry = {
            "attempt": delivery.attempts,
            "at": now.isoformat(),
            "status_code": status_code,
            "error": error,
            "duration_ms": duration_ms,
        }
        delivery.attempt_log = [*delivery.attempt_log, entry][-KEEP_ATTEMPTS:]
        delivery.locked_until = None
        if error is None:
            delivery.status = "delivered"
            delivery.delivered_at = now
            delivery.next_attempt_at = None
        elif delivery.attempts >= get_settings().webhook_max_attempts:
            delivery.status = "failed"
            delivery.next_attempt_at = None
        else:
            delivery.status = "pending"
            delivery.next_attempt_at = now + timedelta(seconds=backoff_seconds(delivery.attempts))
        session.add(delivery)
        session.commit()
        return delivery.status


def send_due(limit: int = 50) -> int:
    """Claim and attempt the deliveries that are due; returns how many were attempted."""
    now = utcnow()
    with session_scope() as session:
        ids = session.exec(
            select(WebhookDelivery.id)
            .where(_due_filter(now))
            .order_by(col(WebhookDelivery.next_attempt_at), col(WebhookDelivery.id))
            .limit(limit)
        ).all()
        claimed = [
            delivery_id
            for delivery_id in ids
            if delivery_id is not None and _claim(session, delivery_id, now)
        ]
    for delivery_id in claimed:
        deliver(delivery_id)
    return len(claimed)


def dispatch_once() -> int:
    """One round of the dispatcher: queue events of newly finished jobs, then send what is due."""
    with session_scope() as session:
        if session.exec(select(Webhook.id).limit(1)).first() is None:
            return 0
        enqueue_finished_jobs(session)
    return send_due()


# ---- the dispatcher thread --------------------------------------------------------------------


class Dispatcher(threading.Thread):
    """A daemon thread that runs :func:`dispatch_once` every ``webhook_poll_seconds`` until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="webhook-dispatcher", daemon=True)
        self.interval = interval
        self.stopping = threading.Event()
        self.wake = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                dispatch_once()
            except Exception:  # keep the thread alive: a bad row or a locked database is retried next round
                log.exception("webhook dispatch failed")
            self.wake.wait(self.interval)
            self.wake.clear()

    def stop(self) -> None:
        """Ask the thread to finish its round and end."""
        self.stopping.set()
        self.wake.set()


_dispatcher: Dispatcher | None = None


def start_dispatcher() -> Dispatcher | None:
    """Start this process's dispatcher (none when ``webhook_poll_seconds`` is 0)."""
    global _dispatcher
    interval = get_settings().webhook_poll_seconds
    if interval <= 0:
        return None
    _dispatcher = Dispatcher(interval)
    _dispatcher.start()
    return _dispatcher


def stop_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Stop a dispatcher started by :func:`start_dispatcher` and wait briefly for it."""
    global _dispatcher
    if dispatcher is None:
        return
    dispatcher.stop()
    dispatcher.join(timeout=get_settings().webhook_timeout_seconds + 5)
    if _dispatcher is dispatcher:
        _dispatcher = None


def wake_dispatcher() -> None:
    """Run the next dispatcher round now rather than at the next tick (after a ping or a redelivery)."""
    if _dispatcher is not None:
        _dispatcher.wake.set()
