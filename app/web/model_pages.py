"""The Models page: the library, what each model is and suits, Hub downloads with live progress (the user's
Hugging Face token is saved on the account page, app/web/auth_pages.py), and where to start when the cache is
empty."""

from contextlib import AbstractContextManager
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from app.core.models import User
from app.core.settings import get_settings
from app.http.auth import CurrentUser
from app.http.deps import SessionDep
from app.services import model_downloads as downloads
from app.services import models as service
from app.web.render import form_errors, render

router = APIRouter(include_in_schema=False)


def _downloads_context(session: Session) -> dict[str, Any]:
    rows = downloads.list_downloads(session, limit=20)
    return {
        "downloads": rows,
        "downloading": any(d.status in downloads.ACTIVE for d in rows),
        "downloads_enabled": get_settings().hub_downloads,
    }


def _page(request: Request, session: Session, user: User, task: str = "") -> HTMLResponse:
    return render(request, "models.html", _context(session, user, task))


def _context(session: Session, user: User, task: str = "", error: str | None = None) -> dict[str, Any]:
    models = service.list_models(task or None)
    context = {
        "nav": "models",
        "models": models,
        "task": task,
        "recommended": service.RECOMMENDED,
        "hub_models": [m for m in models if m.source == "hub"],
        "is_admin": user.is_admin,
        "token_saved": downloads.has_hub_token(session, user.id),
        "error": error,
        **_downloads_context(session),
    }
    return context


@router.get("/models", response_class=HTMLResponse)
def models_page(
    request: Request, session: SessionDep, user: CurrentUser, task: str | None = None
) -> HTMLResponse:
    """Every model the studio can use, filterable by task, downloads and the recommended starting points."""
    return _page(request, session, user, task or "")


@router.get("/models/downloads", response_class=HTMLResponse)
def downloads_fragment(request: Request, session: SessionDep, _user: CurrentUser) -> HTMLResponse:
    """The downloads table alone (htmx refreshes it while a download runs)."""
    return render(request, "_model_downloads.html", _downloads_context(session))


def _form_errors(session: Session, user: User) -> AbstractContextManager[None]:
    """A failed form on the Models page shows the page again with the message (app/web/render.py)."""
    return form_errors("models.html", lambda error: _context(session, user, error=error.message))


def _form_text(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


@router.post("/models/downloads", response_model=None)
async def start_download(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    """Queue a download from the page's form."""
    form = await request.form()
    with _form_errors(session, user):
        downloads.start_download(session, user, _form_text(form, "model_id"), _form_text(form, "revision"))
    return RedirectResponse("/models", status_code=303)


@router.post("/models/downloads/{download_id}/cancel", response_model=None)
def cancel_download(request: Request, session: SessionDep, user: CurrentUser, download_id: int) -> Response:
    """Cancel a download from the page."""
    with _form_errors(session, user):
        downloads.cancel_download(session, user, download_id)
    return RedirectResponse("/models", status_code=303)
