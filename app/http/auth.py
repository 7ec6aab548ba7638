"""Who is asking, and what they may see: the request side of accounts (the rows are app/services/accounts.py).

How a request is authenticated (``authenticate``, an app-wide dependency: ``AUTH_DEPENDENCIES``):

- ``Authorization: Bearer <api token>`` — scripts, the CLI, the API. Browsers never send this header by
  themselves, so such requests need no CSRF token.
- the session cookie ``peft_studio_session`` — pages and the JSON calls the pages make (htmx, fetch,
  EventSource). An unsafe request (POST, PUT, PATCH, DELETE) authenticated this way must carry the CSRF token
  (header ``X-CSRF-Token`` or form field ``csrf_token``), else 403.

The CSRF token is an HMAC of the session token under the secret key, so it needs no storage and dies with the
session.

Ownership: datasets, jobs and adapters carry ``owner_id``. ``owner_scope`` gives ``None`` for the admin (sees
all) and the user's id otherwise; services filter by it and answer NotFound for other people's objects, the
same answer as for an id that does not exist. ``owned_or_404`` does the same for any table with ``owner_id``.
"""

import hashlib
import hmac
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, SQLModel
from starlette.concurrency import run_in_threadpool

from app.core.errors import Forbidden, NotFound, Unauthorized
from app.core.models import User
from app.core.settings import get_settings
from app.http.deps import SessionDep
from app.services.accounts import user_for_api_token, user_for_session

SESSION_COOKIE = "peft_studio_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
# Paths anyone may open. /static, /docs and /openapi.json are not API routes and never reach `authenticate`.
PUBLIC_PATHS = frozenset({"/healthz", "/login", "/login/token", "/register"})
# The request state key under which RequestGate (app/http/gate.py) leaves the user it signed in, with how
# ("token" or "session"): it checked this request's credential already, so ``authenticate`` does not again.
GATE_USER = "gate_user"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
INVALID_TOKEN_MESSAGE = (
    "The API token is not valid: it is unknown, expired or revoked. Create one on /tokens."
)
SIGN_IN_MESSAGE = (
    "Sign in first: send Authorization: Bearer <api token> (create one on /tokens), "
    "or sign in on /login in a browser."
)

_bearer = HTTPBearer(
    auto_error=False, description="An API token from POST /api/v1/tokens or the /tokens page."
)


def csrf_token_for(session_token: str) -> str:
    """The CSRF token of a browser session: an HMAC of its cookie under the secret key."""
    key = get_settings().secret_key.encode("utf-8")
    return hmac.new(key, b"csrf:" + session_token.encode("utf-8"), hashlib.sha256).hexdigest()


def set_session_cookie(response: Response, raw: str) -> None:
    """HttpOnly, SameSite=Lax, Secure in production."""
    settings = get_settings()
    response.set_cookie(
        SESSION_COOKIE,
        raw,
        max_age=int(settings.session_days * 86400),
        httponly=True,
        samesite="lax",
        secure=settings.environment == "production",
        path="/",
    )


def clear_session_cookie(response: Response) -> None:
    """Remove the session cookie from the browser."""
    response.delete_cookie(SESSION_COOKIE, path="/")


def safe_next(next_path: str | None) -> str:
    """``next_path`` when it is a path on this site, else "/" (no open redirects)."""
    if not next_path or not next_path.startswith("/") or next_path.startswith("//") or "\\" in next_path:
        return "/"
    parts = urlsplit(next_path)
    if parts.scheme or parts.netloc or any(ord(ch) < 32 for ch in next_path):
        return "/"
    return next_path


# ---- request authentication -------------------------------------------------------------------


def is_public(path: str) -> bool:
    """Paths anyone may open without signing in."""
    return path in PUBLIC_PATHS


def is_api_path(path: str) -> bool:
    """JSON endpoints: a failed sign-in is a 401 there, a redirect to /login on pages."""
    return path.startswith(("/api/", "/v1/"))


async def _check_csrf(request: Request, expected: str) -> None:
    sent = request.headers.get(CSRF_HEADER)
    content_type = request.headers.get("content-type", "")
    if not sent and content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent, expected):
        raise Forbidden(
            "The form's CSRF token is missing or out of date; reload the page and try again "
            f"(scripts: send Authorization: Bearer <token>, or the {CSRF_HEADER} header)."
        )


async def authenticate(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Every route's gate: find the user from the Bearer token or the session cookie (CSRF-checked)."""
    if is_public(request.url.path):
        return
    _refuse_out_of_range_ids(request)
    gate_user, gate_method = request.scope.get("state", {}).get(GATE_USER) or (None, None)
    if credentials is not None:
        if gate_method == "token":
            user = gate_user
        else:
            user = await run_in_threadpool(user_for_api_token, session, credentials.credentials)
        if user is None:
            raise Unauthorized(INVALID_TOKEN_MESSAGE)
        request.state.auth_method = "token"
    else:
        raw = request.cookies.get(SESSION_COOKIE)
        if gate_method == "session":
            user = gate_user
        else:
            user = await run_in_threadpool(user_for_session, session, raw) if raw else None
        if user is None or raw is None:
            raise Unauthorized(SIGN_IN_MESSAGE)
        request.state.auth_method = "session"
        request.state.csrf_token = csrf_token_for(raw)
        if request.method in UNSAFE_METHODS:
            await _check_csrf(request, request.state.csrf_token)
    request.state.user = user
    # Give the connection back before the handler runs: between here and the handler's own first query a busy
    # process may take a while (and a stream never ends its dependencies' sessions until the viewer leaves), so
    # holding it made a thousand arriving viewers exhaust the pool. ``user`` stays usable, detached; the session
    # opens a new connection for the handler's first query.
    session.close()


# The largest id a database integer column holds everywhere (Postgres INTEGER); larger ids cannot exist.
MAX_ID = 2**31 - 1


def _refuse_out_of_range_ids(request: Request) -> None:
    """An id in the path beyond any database integer is NotFound, not a database overflow (a 500)."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) > MAX_ID:
            raise NotFound(f"{name.removesuffix('_id').capitalize()} {value} does not exist.")


async def current_user(request: Request) -> User:
    """The signed-in user (set by ``authenticate``)."""
    user = getattr(request.state, "user", None)
    if user is None:
        raise Unauthorized("Sign in first.")
    return user  # type: ignore[no-any-return]


CurrentUser = Annotated[User, Depends(current_user)]


async def require_admin(user: CurrentUser) -> User:
    """The signed-in user when they are the admin, else 403."""
    if not user.is_admin:
        raise Forbidden("Only the admin may do this.")
    return user


AdminUser = Annotated[User, Depends(require_admin)]


def owner_scope(user: CurrentUser) -> int | None:
    """The owner filter for this user: None for the admin (sees everything), else their id."""
    return None if user.is_admin else user.id


async def _owner_scope_dependency(user: CurrentUser) -> int | None:
    return owner_scope(user)


# The user dependencies are async (no blocking work in them): a sync one costs each request a thread hop.
OwnerScope = Annotated[int | None, Depends(_owner_scope_dependency)]


T = TypeVar("T", bound=SQLModel)


def owned_or_404(
    session: Session, model: type[T], object_id: int, user: User | int | None, label: str = ""
) -> T:
    """The row when it exists and ``user`` may see it (owner or admin); NotFound otherwise, the same answer.

    ``user`` is a User, or an owner scope (``OwnerScope``: None means the admin).
    """
    row = session.get(model, object_id)
    scope = owner_scope(user) if isinstance(user, User) else user
    if row is None or (scope is not None and getattr(row, "owner_id", None) != scope):
        raise NotFound(f"{label or model.__name__} {object_id} does not exist.")
    return row


def csrf_token(request: Request) -> str:
    """The CSRF token for forms on this page ("" when the page was fetched with a Bearer token)."""
    return str(getattr(request.state, "csrf_token", ""))


AUTH_DEPENDENCIES: list[Any] = [Depends(authenticate)]
