"""One error path: every domain error, validation error and failure of a request is answered here.

``install(app, ...)`` registers the app's exception handlers. Which shape an answer takes depends only on the
request, decided in one place (``studio_error``):

- ``/v1/*`` (the OpenAI-compatible API): OpenAI's ``{"error": {...}}`` shape;
- ``/api/*``: ``{"detail", "field", "row"}`` JSON (``StudioError.to_dict``);
- an htmx request (``HX-Request: true``) for a page: the ``_error.html`` fragment with the message and the
  error's status, never a whole page and never JSON;
- a ``PageError`` (a page's form that failed): the page's own template again, with the user's values and the
  message, under the error's status;
- a browser asking for HTML: the ``error.html`` page; anything else: JSON.

``Unauthorized`` is a 401 for the APIs and a redirect to /login for pages (``unauthorized_response``, which the
request gate answers with too). Pydantic validation errors become person-readable ``{field, message}`` items
once (``validation_items``), for the API, the forms and the pages alike.

Page handlers therefore need no ``try``/``except`` for domain errors: they let them rise, and a form that
re-renders itself on failure wraps its work in ``app.web.render.form_errors``, which raises ``PageError``.

The HTML side and the OpenAI shapes belong to ``app/web`` and ``app/api``, which this layer may not import: the
app hands them to ``install`` (``app/main.py``).
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import StudioError, Unauthorized
from app.http.auth import is_api_path, safe_next


class RenderPage(Protocol):
    """How the web side renders a template: ``render(request, name, context, status_code)``."""

    def __call__(
        self, request: Request, name: str, context: Mapping[str, Any], status_code: int
    ) -> Response: ...


OpenAIError = Callable[[int, str, str | None], Response]
OpenAIValidation = Callable[[RequestValidationError], Response]


class PageError(StudioError):
    """A domain error answered with the page's own form again: ``template`` rendered with ``context`` (the
    user's values and the message), under the original error's status. An htmx request gets the error
    fragment instead, like any other domain error."""

    def __init__(self, error: StudioError, template: str, context: Mapping[str, Any]) -> None:
        super().__init__(error.message, field=error.field, row=error.row)
        self.status_code = error.status_code
        self.error = error
        self.template = template
        self.context = dict(context)


# ---- answer shapes ----------------------------------------------------------------------------


def openai_error_body(
    status_code: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI answers errors."""
    if status_code == 401:
        kind = "authentication_error"
    elif status_code == 429:
        kind = "rate_limit_error"
    else:
        kind = "invalid_request_error" if status_code < 500 else "server_error"
    codes = {
        401: "invalid_api_key",
        404: "not_found",
        405: "method_not_allowed",
        409: "conflict",
        413: "request_too_large",
        429: "rate_limit_exceeded",
        500: "internal_error",
        503: "service_unavailable",
    }
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or codes.get(status_code)}
    }


def is_openai_path(path: str) -> bool:
    """Routes of the OpenAI-compatible API, which answer errors in OpenAI's shape."""
    return path == "/v1" or path.startswith("/v1/")


def error_json(
    path: str, status_code: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error answer in the shape of the path's API: OpenAI's on /v1, ``{"detail"}`` elsewhere."""
    body = openai_error_body(status_code, message) if is_openai_path(path) else {"detail": message}
    return JSONResponse(body, status_code=status_code, headers=headers)


def is_htmx(request: Request) -> bool:
    """True for a request htmx made (it swaps a fragment of the page, so it must not get a whole page)."""
    return request.headers.get("hx-request") == "true"


def wants_html(request: Request) -> bool:
    """A page request from a browser (or htmx): errors are HTML there, JSON on the APIs and for scripts."""
    if is_api_path(request.url.path):
        return False
    return is_htmx(request) or "text/html" in request.headers.get("accept", "")


def unauthorized_response(request: Request, message: str) -> Response:
    """The answer to a request without valid credentials: 401 for the APIs (OpenAI's error shape on /v1), a
    redirect to /login for pages. Reads only the request's headers (the request gate sends it before any body)."""
    path = request.url.path
    if is_api_path(path):
        return error_json(path, 401, message, headers={"WWW-Authenticate": "Bearer"})
    if is_htmx(request):
        current = urlsplit(request.headers.get("hx-current-url", "/"))
        target = "/login?next=" + quote(safe_next(current.path or "/"))
        return Response(status_code=401, headers={"HX-Redirect": target})
    here = path + (f"?{request.url.query}" if request.url.query else "")
    next_path = here if request.method == "GET" else "/"
    return RedirectResponse("/login?next=" + quote(safe_next(next_path)), status_code=303)


# ---- validation messages ----------------------------------------------------------------------


def _field_path(location: Iterable[object], default: str) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or default


def validation_items(
    errors: Iterable[Mapping[str, Any]], default_field: str = "body"
) -> list[dict[str, str]]:
    """Pydantic/FastAPI validation errors as ``{field, message}`` a person can act on (dotted field names,
    without pydantic's "Value error, " prefix); ``default_field`` names a problem of the whole input."""
    return [_validation_item(error, default_field) for error in errors]


def _validation_item(error: Mapping[str, Any], default_field: str) -> dict[str, str]:
    if error.get("type") == "json_invalid":
        # FastAPI puts the character offset where the field name would be.
        location = tuple(error.get("loc", ()))
        offset = location[-1] if location else "?"
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        message = f"the request body is not valid JSON: {reason} at character {offset}"
        return {"field": "body", "message": message}
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")  # the field already says where
    if error.get("type") == "extra_forbidden":
        message = "Extra inputs are not permitted: not a field of this request (misspelt? see /docs)"
    if message.startswith("Expected UploadFile"):
        # A multipart part without a file name (e.g. a form sent with no file chosen) arrives as text.
        message = "no file was attached; send the file as a multipart part with a file name"
    return {"field": _field_path(error.get("loc", ()), default_field), "message": message}


# ---- the handlers -----------------------------------------------------------------------------


OUT_OF_RANGE_MESSAGE = (
    "A number in the request is beyond what the database holds (ids and counts fit in 32 bits)."
)


def install(
    app: FastAPI, *, render: RenderPage, openai_error: OpenAIError, openai_validation: OpenAIValidation
) -> None:
    """Register the app's exception handlers: domain errors, validation errors, HTTP errors, database
    overflows and the last-resort 500, each mapped to JSON, OpenAI's shape or HTML as described above."""
    from sqlalchemy.exc import DataError

    def error_page(request: Request, status_code: int, message: str) -> Response:
        name = "_error.html" if is_htmx(request) else "error.html"
        return render(request, name, {"status_code": status_code, "message": message}, status_code)

    async def studio_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StudioError)
        path = request.url.path
        if isinstance(exc, Unauthorized):
            return unauthorized_response(request, exc.message)
        if is_openai_path(path):
            return openai_error(exc.status_code, exc.message, exc.field)
        if isinstance(exc, PageError) and not is_api_path(path) and not is_htmx(request):
            return render(request, exc.template, exc.context, exc.status_code)
        if wants_html(request):
            return error_page(request, exc.status_code, exc.message)
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        if is_openai_path(request.url.path):
            return openai_validation(exc)
        errors = validation_items(exc.errors())
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        if wants_html(request):
            return error_page(request, 422, message)
        return JSONResponse({"detail": message, "errors": errors}, status_code=422)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        # Unknown /v1 paths (404) and wrong methods (405) answer in OpenAI's shape like the routes do.
        if is_openai_path(request.url.path):
            response = openai_error(exc.status_code, str(exc.detail), None)
            response.headers.update(exc.headers or {})
            return response
        return await http_exception_handler(request, exc)

    async def out_of_range(request: Request, exc: Exception) -> Response:
        # Numbers in queries that overflow the database's integers (SQLite raises OverflowError).
        return JSONResponse({"detail": OUT_OF_RANGE_MESSAGE}, status_code=422)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette still logs the traceback; the client gets no detail of it.
        if is_openai_path(request.url.path):
            return openai_error(500, "The server failed to answer this request; it was logged.", None)
        return PlainTextResponse("Internal Server Error", status_code=500)

    app.add_exception_handler(StudioError, studio_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OverflowError, out_of_range)
    app.add_exception_handler(DataError, out_of_range)
    app.add_exception_handler(Exception, server_error)
