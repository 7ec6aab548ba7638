"""The pages' rendering setup: the Jinja2 templates, their filters and globals, ``render``, the error page and
fragment, the htmx-aware redirect, and ``form_errors`` for forms that show their own errors.

Every page module renders through ``render`` here (templates live in ``templates/``; partials start with ``_``
for htmx swaps).
"""

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context
from markupsafe import Markup

from app.core.db import PROJECT_ROOT
from app.core.errors import StudioError
from app.http.auth import csrf_token
from app.http.errors import PageError, is_htmx
from app.services.compare import display_value, metric_rows

templates = Jinja2Templates(directory=str(PROJECT_ROOT / "templates"))


# ---- template helpers -------------------------------------------------------------------------


def human_bytes(size: int | float | None) -> str:
    """1536 -> '1.5 KB'."""
    if size is None:
        return "—"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def human_duration(seconds: float | None) -> str:
    """95 -> '1m 35s'."""
    if seconds is None:
        return "—"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def human_time(moment: datetime | None) -> str:
    """A timestamp in UTC, to the second."""
    if moment is None:
        return "—"
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def human_number(value: float | int | None, digits: int = 4) -> str:
    """Integers with thousands separators, floats to a few significant digits."""
    if value is None:
        return "—"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def ordinal(number: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ..."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


templates.env.filters.update(
    ordinal=ordinal,
    bytes=human_bytes,
    duration=human_duration,
    time=human_time,
    number=human_number,
    tojson_pretty=lambda v: json.dumps(v, indent=2, sort_keys=False),
    setting=display_value,
    metric_rows=metric_rows,
)


@pass_context
def _csrf_input(context: Mapping[str, Any]) -> Markup:
    """``{{ csrf_input() }}`` in a form: the hidden CSRF field of the signed-in browser."""
    request = context.get("request")
    token = csrf_token(request) if request is not None else ""
    return Markup('<input type="hidden" name="csrf_token" value="{}">').format(token)


@pass_context
def _csrf_value(context: Mapping[str, Any]) -> str:
    request = context.get("request")
    return csrf_token(request) if request is not None else ""


@pass_context
def _signed_in_user(context: Mapping[str, Any]) -> Any:
    request = context.get("request")
    return getattr(request.state, "user", None) if request is not None else None


templates.env.globals.update(csrf_input=_csrf_input, csrf_token=_csrf_value, signed_in_user=_signed_in_user)


def render(
    request: Request, name: str, context: Mapping[str, Any] | None = None, status_code: int = 200
) -> HTMLResponse:
    """Render a template (the context's ``nav`` marks the current page in the navigation bar)."""
    return templates.TemplateResponse(request, name, dict(context or {}), status_code=status_code)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    """An error rendered as a page (or as a fragment for htmx requests)."""
    name = "_error.html" if is_htmx(request) else "error.html"
    return templates.TemplateResponse(
        request, name, {"status_code": status_code, "message": message}, status_code=status_code
    )


def redirect(request: Request, url: str) -> Response:
    """A redirect that htmx follows with a full page load, and a plain browser with a GET."""
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


@contextmanager
def form_errors(template: str, context: Callable[[StudioError], Mapping[str, Any]]) -> Iterator[None]:
    """Inside: a domain error re-renders the form's page, ``template`` with ``context(error)`` (the user's values
    and the message), under the error's status. It is raised on as ``PageError`` and answered by the one error
    handler (app/http/errors.py), which gives htmx requests the error fragment instead."""
    try:
        yield
    except PageError:
        raise
    except StudioError as exc:
        raise PageError(exc, template, context(exc)) from exc
