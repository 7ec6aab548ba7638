"""``/api/v1/models``: the model library (bundled, registered folders, the Hub cache). Named apart from the
OpenAI layer's ``/v1/models``, which lists adapters to generate with."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from app.core.db import session_scope
from app.core.settings import get_settings
from app.http.auth import AdminUser, CurrentUser
from app.http.deps import SessionDep
from app.services import model_downloads as downloads
from app.services import models as service

router = APIRouter(tags=["models"])


@router.get("/api/v1/models")
def list_models(_user: CurrentUser, task: str | None = None) -> dict[str, Any]:
    """Every base model the studio can use, with architecture, parameters, context length, dtype, size,
    chat template, licence, tasks and fetch date; ``task`` keeps those suited to one task."""
    rows = [m.public() for m in service.list_models(task)]
    return {"data": rows, "count": len(rows), "recommended": service.RECOMMENDED}


@router.get("/api/v1/models/{model_id:path}")
def get_model(model_id: str, _user: CurrentUser) -> dict[str, Any]:
    """One library model by id (``owner/name`` for Hub models, the folder path for registered folders)."""
    return service.get_model(model_id).public()


@router.delete("/api/v1/models/{model_id:path}")
def delete_model(model_id: str, _admin: AdminUser) -> dict[str, Any]:
    """Remove a downloaded Hub model from the cache (admin); returns the bytes freed."""
    return {"model_id": model_id, "freed_bytes": service.delete_model(model_id)}


class DownloadRequest(BaseModel):
    """A Hub model to fetch into the shared cache."""

    model_id: str = Field(description="The Hub id, owner/name.", max_length=200)
    revision: str | None = Field(
        default=None, description="Branch, tag or commit; main when empty.", max_length=200
    )


class HubTokenRequest(BaseModel):
    """A Hugging Face access token (read scope is enough)."""

    token: str = Field(max_length=500)


@router.post("/api/v1/model-downloads", status_code=202)
def start_download(body: DownloadRequest, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    """Queue a download of a Hub model into the Hub cache the workers share (503 when downloads are off)."""
    return downloads.progress(downloads.start_download(session, user, body.model_id, body.revision))


@router.get("/api/v1/model-downloads")
def list_downloads(session: SessionDep, _user: CurrentUser) -> dict[str, Any]:
    """The latest downloads with their progress, newest first, and whether downloads are on."""
    rows = [downloads.progress(d) for d in downloads.list_downloads(session)]
    return {"data": rows, "count": len(rows), "enabled": get_settings().hub_downloads}


@router.get("/api/v1/model-downloads/{download_id}")
def get_download(download_id: int, session: SessionDep, _user: CurrentUser) -> dict[str, Any]:
    """One download: status, bytes and files done of the total, speed, ETA, error."""
    return downloads.progress(downloads.get_download(session, download_id))


@router.post("/api/v1/model-downloads/{download_id}/cancel")
def cancel_download(download_id: int, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    """Cancel a download (its owner or an admin); finished files stay, so asking again fetches the rest."""
    return downloads.progress(downloads.cancel_download(session, user, download_id))


@router.get("/api/v1/model-downloads/{download_id}/stream")
async def stream_download(download_id: int, request: Request, _user: CurrentUser) -> EventSourceResponse:
    """Server-Sent Events: a ``progress`` event whenever the download's row changes, then ``end`` when it
    has finished. The row is polled twice a second per viewer: downloads are few and short-lived, unlike
    job streams, so they do not need the jobs' shared fan-out."""
    with session_scope() as session:
        downloads.get_download(session, download_id)

    async def events() -> AsyncIterator[ServerSentEvent]:
        last: dict[str, Any] | None = None
        while not await request.is_disconnected():
            with session_scope() as session:
                current = downloads.progress(downloads.get_download(session, download_id))
            if current != last:
                yield ServerSentEvent(data=json.dumps(current), event="progress")
                last = current
            if current["status"] in downloads.FINISHED:
                yield ServerSentEvent(data=json.dumps({"status": current["status"]}), event="end")
                return
            await asyncio.sleep(0.5)

    return EventSourceResponse(events(), ping=15)


@router.get("/api/v1/me/hub-token")
def hub_token_saved(session: SessionDep, user: CurrentUser) -> dict[str, bool]:
    """Whether you saved a Hugging Face token (the token itself is never shown again)."""
    return {"saved": downloads.has_hub_token(session, user.id)}


@router.put("/api/v1/me/hub-token", status_code=204)
def save_hub_token(body: HubTokenRequest, session: SessionDep, user: CurrentUser) -> Response:
    """Save your Hugging Face token for gated models, encrypted with the studio's secret key."""
    downloads.save_hub_token(session, user, body.token)
    return Response(status_code=204)


@router.delete("/api/v1/me/hub-token", status_code=204)
def delete_hub_token(session: SessionDep, user: CurrentUser) -> Response:
    """Forget your Hugging Face token."""
    downloads.delete_hub_token(session, user)
    return Response(status_code=204)
