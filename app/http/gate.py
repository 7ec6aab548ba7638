"""The request gate in front of every route: security headers on every response, and sign-in checked before
any of the request body is read.

Why an ASGI middleware and not only the app-wide dependency (``app.http.auth.authenticate``): FastAPI reads and
parses a request's body (a multipart upload spooled to a temporary file, a JSON body parsed into memory) before
it runs the route's dependencies, so a dependency alone let anyone without credentials make the server write
or hold a gigabyte before answering 401. Here the credential is checked from the headers only (a bearer token
or the session cookie, looked up with the same functions the dependency uses, in a worker thread, or taken
from the few seconds' memory of valid credentials, ``app.services.credential_cache``) and a request
without a valid one is answered at once; the dependency still runs afterwards (CSRF, ``request.state.user``).
The body-size cap that counts bytes as they arrive is ``app.http.safety.BodySizeLimit``, the next layer in.

The answer to a refused request is the one the dependency gives: 401 JSON on ``/api/``, 401 in OpenAI's error
shape on ``/v1/``, a redirect to /login for pages (``HX-Redirect`` for htmx).
"""

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import anyio
from fastapi import FastAPI
from sqlalchemy import inspect
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.models import User, utcnow
from app.core.settings import get_settings
from app.http.auth import GATE_USER, INVALID_TOKEN_MESSAGE, SESSION_COOKIE, SIGN_IN_MESSAGE, is_public
from app.http.errors import is_openai_path, openai_error_body, unauthorized_response
from app.http.safety import BodySizeLimit
from app.services.accounts import session_sign_in, token_sign_in
from app.services.credential_cache import credentials, current_epoch

# Our pages load scripts and styles from /static only. Inline style attributes carry computed widths (progress
# bars, histograms), so styles allow them; scripts never run inline (no eval, no inline handlers).
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# /docs is Swagger UI served from /static with a static start-up file (app/web/api_docs.py): our page policy
# fits it; only its own style and image data need what PAGE_CSP already allows.
DOCS_CSP = PAGE_CSP
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
HSTS = "max-age=31536000; includeSubDomains"


def security_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The headers every response carries; HSTS only when the request came over HTTPS.

    The scheme is the one uvicorn reports: behind a proxy it comes from ``X-Forwarded-Proto`` when the proxy's
    address is trusted (uvicorn's ``--forwarded-allow-ips`` / ``FORWARDED_ALLOW_IPS``), never from any client.
    """
    csp = DOCS_CSP if scope.get("path") in DOCS_PATHS else PAGE_CSP
    headers = [
        (b"content-security-policy", csp.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
    ]
    if scope.get("scheme") == "https":
        headers.append((b"strict-transport-security", HSTS.encode()))
    return headers


def _with_headers(message: Message, extra: Iterable[tuple[bytes, bytes]]) -> Message:
    present = {name.lower() for name, _ in message.get("headers", ())}
    headers = list(message.get("headers", ()))
    headers.extend((name, value) for name, value in extra if name not in present)
    return {**message, "headers": headers}


def needs_sign_in(path: str) -> bool:
    """True for every path but the public ones: sign-in pages, /healthz, /static, and the API docs outside
    production."""
    if is_public(path) or path.startswith("/static/"):
        return False
    if path in DOCS_PATHS:
        return get_settings().environment == "production"
    return True


def _credentials(scope: Scope) -> tuple[str | None, str | None]:
    """The bearer token and the session cookie of a request, read from its headers only."""
    request = Request(scope)
    bearer = None
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        bearer = value.strip()
    return bearer, request.cookies.get(SESSION_COOKIE)


def signed_in_user(bearer: str | None, cookie: str | None) -> User | None:
    """The active user of the bearer token (or, without one, of the session cookie), detached with its columns
    loaded, or None. A credential found valid is remembered for a few seconds (``credential_cache``).

    Blocking database work: call it in a thread.
    """
    from app.core.db import session_scope

    kind, raw = ("token", bearer) if bearer is not None else ("session", cookie)
    if raw is None:
        return None
    epoch = current_epoch()  # read before the lookup: a change committed meanwhile makes the entry stale
    with session_scope() as session:
        found = token_sign_in(session, raw) if kind == "token" else session_sign_in(session, raw)
        if found is None:
            return None
        user, expires = found
        if inspect(user).expired_attributes:  # a token's last-use write expired it: load it while attached
            session.refresh(user)
        session.expunge(user)
    credentials.put(kind, raw, user, expires, epoch)
    return user


def remembered_user(bearer: str | None, cookie: str | None) -> User | None:
    """The user a credential signed in a moment ago, when nothing about accounts changed since (no database
    work: a dictionary and one ``stat``, fine on the event loop); None when it must be looked up."""
    if bearer is not None:
        return credentials.get("token", bearer, utcnow())
    return credentials.get("session", cookie, utcnow()) if cookie is not None else None


class RequestGate:
    """Outermost layer of the app: adds the security headers, and refuses a request to a non-public path
    without valid credentials before its body is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = _with_headers(message, extra)
            await send(message)

        if needs_sign_in(scope["path"]):
            bearer, cookie = _credentials(scope)
            user = remembered_user(bearer, cookie)
            if user is None and (bearer or cookie):
                user = await anyio.to_thread.run_sync(signed_in_user, bearer, cookie)
            if user is None:
                response = await refusal(scope, bearer is not None)
                await response(scope, _no_body, send_with_headers)
                return
            # ``authenticate`` takes the user from here instead of looking the same credential up again
            scope.setdefault("state", {})[GATE_USER] = (user, "token" if bearer is not None else "session")
        await self.app(scope, receive, send_with_headers)


async def _no_body() -> Message:
    """A ``receive`` for refused requests: their body is never read."""
    return {"type": "http.disconnect"}


async def refusal(scope: Scope, had_token: bool) -> Response:
    """The 401 (or sign-in redirect) for a request without valid credentials, as ``authenticate`` gives it."""
    response = unauthorized_response(Request(scope), INVALID_TOKEN_MESSAGE if had_token else SIGN_IN_MESSAGE)
    # The body of this request is never read: tell the client not to reuse the connection.
    response.headers["connection"] = "close"
    return response


# ---- JSON numbers that are not numbers -------------------------------------------------------

_NOT_FINITE = re.compile(rb"NaN|Infinity|\d[eE]\+?\d{3}")


class _NotFinite:
    """Stands in for NaN/Infinity while a body is parsed, so the field that held it can be named."""

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_number(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


def _first_not_finite(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """The dotted path and text of the first NaN/Infinity (or overflowing number) in a parsed body."""
    if isinstance(value, _NotFinite):
        return ".".join(path) or "body", value.text
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    for key, item in items:
        found = _first_not_finite(item, (*path, str(key)))
        if found:
            return found
    return None


def not_finite_field(body: bytes) -> tuple[str, str] | None:
    """``(field, text)`` of the first number in a JSON body that is not finite, else None (also for bodies
    that are not JSON: the route's own validation words those)."""
    if not _NOT_FINITE.search(body):
        return None
    try:
        parsed = json.loads(body, parse_constant=_NotFinite, parse_float=_parse_number)
    except ValueError:
        return None
    return _first_not_finite(parsed)


class FiniteJsonNumbers:
    """Refuse a JSON body that holds NaN, Infinity or a number beyond a double (1e999), naming the field.

    Python's JSON parser accepts these, JSON itself does not, and pydantic lets them through float fields with
    ``gt``/``le`` bounds (every comparison with NaN is false), so they are caught here once for every route.
    Sits inside ``BodySizeLimit``: the body it holds in memory is at most PEFT_STUDIO_MAX_JSON_BYTES.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        found = not_finite_field(body)
        if found is not None:
            field, text = found
            path = scope["path"]
            message_text = f"{field}: must be a finite number (got {text}; JSON has no NaN or Infinity)"
            if is_openai_path(path):
                error = openai_error_body(400, message_text, field, "invalid_value")
                response = JSONResponse(error, status_code=400)
            else:
                errors = [{"field": field, "message": f"must be a finite number (got {text})"}]
                response = JSONResponse({"detail": message_text, "errors": errors}, status_code=422)
            await response(scope, receive, send)
            return
        await self.app(
            scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send
        )


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A ``receive`` that hands out ``messages`` first, then defers to ``then`` (a disconnect, usually)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def install(app: FastAPI) -> None:
    """The request's layers, outermost first: ``RequestGate`` (security headers; sign-in checked before the
    body is read), ``BodySizeLimit`` (app/http/safety.py: a body stops at its limit while it arrives), and
    ``FiniteJsonNumbers`` (no NaN or Infinity in JSON bodies). The app-wide ``authenticate`` dependency
    (``app.http.auth.AUTH_DEPENDENCIES``) runs after them, inside the route."""
    app.add_middleware(FiniteJsonNumbers)  # innermost: holds a JSON body that BodySizeLimit already capped
    app.add_middleware(BodySizeLimit)
    app.add_middleware(RequestGate)  # added last: the outermost layer, so every answer gets its headers
