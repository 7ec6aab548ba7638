"""/api/v1/webhooks: register URLs for job events, see every delivery attempt; the /webhooks page.

The webhook dispatcher thread is started by the app's lifespan in one web process (app/services/background.py).
"""

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from app.core.errors import StudioError
from app.core.models import Webhook, WebhookDelivery
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import audit
from app.services import webhooks as service

router = APIRouter()


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored
    url: str = Field(min_length=1, max_length=2000, description="Where events are POSTed (http or https).")
    secret: str | None = Field(
        default=None,
        max_length=200,
        description="Key of the HMAC-SHA256 signature (at least 16 characters); left out, one is generated.",
    )
    events: list[str] | None = Field(
        default=None, description="Any of job.succeeded, job.failed, job.cancelled; left out, all three."
    )
    description: str = Field(default="", max_length=200)


class WebhookPublic(BaseModel):
    id: int
    url: str
    description: str
    events: list[str]
    active: bool
    secret_hint: str = Field(description="The secret's first and last characters, to recognise it.")
    created_at: datetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="The signing secret; shown only in this response.")


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]
    count: int


class DeliveryPublic(BaseModel):
    id: int
    webhook_id: int
    job_id: int | None
    event_id: str
    event_type: str
    status: str = Field(description="pending, sending, delivered or failed.")
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    attempt_log: list[dict[str, Any]] = Field(
        description="Every attempt: attempt, at, status_code, error, duration_ms."
    )
    payload: dict[str, Any]
    created_at: datetime
    delivered_at: datetime | None


class DeliveriesPublic(BaseModel):
    data: list[DeliveryPublic]
    count: int


def _hint(secret: str) -> str:
    return f"{secret[:6]}…{secret[-4:]}" if len(secret) > 12 else "…"


def webhook_public(webhook: Webhook) -> WebhookPublic:
    """The public shape of a webhook (its secret only as a hint)."""
    return WebhookPublic(
        id=webhook.id or 0,
        url=webhook.url,
        description=webhook.description,
        events=list(webhook.events),
        active=webhook.active,
        secret_hint=_hint(webhook.secret),
        created_at=webhook.created_at,
    )


def delivery_public(delivery: WebhookDelivery) -> DeliveryPublic:
    """The public shape of a delivery."""
    return DeliveryPublic.model_validate(delivery, from_attributes=True)


@router.post(
    "/api/v1/webhooks", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated, tags=["webhooks"]
)
def create_webhook(session: SessionDep, user: CurrentUser, body: WebhookCreate) -> WebhookCreated:
    """Register a URL for your job events; the response carries the signing secret (shown only once)."""
    webhook = service.create_webhook(session, body.url, body.secret, body.events, body.description, user.id)
    audit.record(session, user, "create", "webhook", webhook.id)
    return WebhookCreated(**webhook_public(webhook).model_dump(), secret=webhook.secret)


@router.get("/api/v1/webhooks", response_model=WebhooksPublic, tags=["webhooks"])
def list_webhooks(session: SessionDep, owner_id: OwnerScope) -> WebhooksPublic:
    """Your webhooks (the admin sees everyone's)."""
    rows = service.list_webhooks(session, owner_id)
    return WebhooksPublic(data=[webhook_public(row) for row in rows], count=len(rows))


@router.get("/api/v1/webhooks/{webhook_id}", response_model=WebhookPublic, tags=["webhooks"])
def get_webhook(session: SessionDep, owner_id: OwnerScope, webhook_id: int) -> WebhookPublic:
    """One webhook."""
    return webhook_public(service.get_webhook(session, webhook_id, owner_id))


@router.delete("/api/v1/webhooks/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["webhooks"])
def delete_webhook(session: SessionDep, user: CurrentUser, owner_id: OwnerScope, webhook_id: int) -> None:
    """Delete a webhook and its delivery log."""
    service.delete_webhook(session, webhook_id, owner_id)
    audit.record(session, user, "delete", "webhook", webhook_id)


@router.post(
    "/api/v1/webhooks/{webhook_id}/ping",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeliveryPublic,
    tags=["webhooks"],
)
def ping_webhook(session: SessionDep, owner_id: OwnerScope, webhook_id: int) -> DeliveryPublic:
    """Queue a signed `ping` event, to check the receiver."""
    return delivery_public(service.queue_ping(session, webhook_id, owner_id))


@router.get("/api/v1/webhooks/{webhook_id}/deliveries", response_model=DeliveriesPublic, tags=["webhooks"])
def list_deliveries(
    session: SessionDep, owner_id: OwnerScope, webhook_id: int, limit: int = 100
) -> DeliveriesPublic:
    """The delivery log, newest first: each event with its status and every attempt."""
    rows = service.list_deliveries(session, webhook_id, owner_id, limit=min(max(limit, 1), 1000))
    return DeliveriesPublic(data=[delivery_public(row) for row in rows], count=len(rows))


@router.post(
    "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeliveryPublic,
    tags=["webhooks"],
)
def redeliver(session: SessionDep, owner_id: OwnerScope, webhook_id: int, delivery_id: int) -> DeliveryPublic:
    """Send a delivery again now (e.g. a failed one, once the receiver is fixed)."""
    return delivery_public(service.redeliver(session, webhook_id, delivery_id, owner_id))


# ---- the page ---------------------------------------------------------------------------------


def _page(
    request: Request,
    session: Any,
    owner_id: int | None,
    error: str | None = None,
    created: Webhook | None = None,
) -> Response:
    from app.web.render import render

    hooks = service.list_webhooks(session, owner_id)
    deliveries = {hook.id: service.list_deliveries(session, hook.id or 0, limit=20) for hook in hooks}
    return render(
        request,
        "webhooks.html",
        {
            "nav": "webhooks",
            "webhooks": [webhook_public(hook) for hook in hooks],
            "deliveries": deliveries,
            "events": service.JOB_EVENTS,
            "error": error,
            "created": created,
        },
        status_code=422 if error else 200,
    )


@router.get("/webhooks", response_class=HTMLResponse, include_in_schema=False)
def webhooks_page(request: Request, session: SessionDep, owner_id: OwnerScope) -> Response:
    """Webhooks with their recent deliveries, and a form to add one."""
    return _page(request, session, owner_id)


@router.post("/webhooks", include_in_schema=False)
def webhooks_form(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    owner_id: OwnerScope,
    url: str = Form(...),
    secret: str = Form(default=""),
    description: str = Form(default=""),
) -> Response:
    """Add a webhook from the page; the new secret is shown once."""
    try:
        webhook = service.create_webhook(session, url, secret or None, None, description, user.id)
    except StudioError as exc:
        return _page(request, session, owner_id, error=exc.message)
    audit.record(session, user, "create", "webhook", webhook.id)
    return _page(request, session, owner_id, created=webhook)


@router.post("/webhooks/{webhook_id}/delete", include_in_schema=False)
def webhooks_delete(
    session: SessionDep, user: CurrentUser, owner_id: OwnerScope, webhook_id: int
) -> Response:
    """Delete a webhook from the page."""
    service.delete_webhook(session, webhook_id, owner_id)
    audit.record(session, user, "delete", "webhook", webhook_id)
    return RedirectResponse("/webhooks", status_code=status.HTTP_303_SEE_OTHER)
