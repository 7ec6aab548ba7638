"""Accounts, API tokens, browser sessions, CSRF and ownership: who is asking, and what they may see.

How a request is authenticated (``authenticate``, applied to every route of the app in ``install``):

- ``Authorization: Bearer <api token>`` — scripts, the CLI, the API. Browsers never send this header by
  themselves, so such requests need no CSRF token.
- the session cookie ``peft_studio_session`` — pages and the JSON calls the pages make (htmx, fetch,
  EventSource). An unsafe request (POST, PUT, PATCH, DELETE) authenticated this way must carry the CSRF token
  (header ``X-CSRF-Token`` or form field ``csrf_token``), else 403.

Secrets are never stored in clear: API tokens, one-time login tokens and session tokens are random 256-bit
values of which only the sha256 is kept (a fast hash is enough for high-entropy tokens; argon2 is for
passwords, which people choose). The CSRF token is an HMAC of the session token under the secret key, so it
needs no storage and dies with the session.

Ownership: datasets, jobs and adapters carry ``owner_id``. ``owner_scope`` gives ``None`` for the admin (sees
all) and the user's id otherwise; services filter by it and answer NotFound for other people's objects, the
same answer as for an id that does not exist. ``owned_or_404`` does the same for any table with ``owner_id``.
"""

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, SQLModel, col, func, select
from starlette.concurrency import run_in_threadpool

from app.core.errors import Conflict, Forbidden, NotFound, StudioError, TooManyJobs, Unauthorized
from app.core.models import (
    Adapter,
    ApiToken,
    ApiTokenPublic,
    BrowserSession,
    Dataset,
    Job,
    JobStatus,
    LoginToken,
    User,
    UserPublic,
    utcnow,
)
from app.core.settings import Settings, get_settings
from app.http.deps import SessionDep

TOKEN_PREFIX = "pst_"
SESSION_COOKIE = "peft_studio_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
MIN_PASSWORD_LENGTH = 8
# Paths anyone may open. /static, /docs and /openapi.json are not API routes and never reach `authenticate`.
PUBLIC_PATHS = frozenset({"/healthz", "/login", "/login/token", "/register"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
INVALID_TOKEN_MESSAGE = (
    "The API token is not valid: it is unknown, expired or revoked. Create one on /tokens."
)
SIGN_IN_MESSAGE = (
    "Sign in first: send Authorization: Bearer <api token> (create one on /tokens), "
    "or sign in on /login in a browser."
)
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")

_hasher = PasswordHasher()
_bearer = HTTPBearer(
    auto_error=False, description="An API token from POST /api/v1/tokens or the /tokens page."
)


class InvalidAccount(StudioError):
    status_code = 422


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without a zone; they are stored in UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def hash_secret(token: str) -> str:
    """The stored form of a high-entropy token: its sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits) with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# ---- users ------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """argon2id hash of a password, refused when shorter than MIN_PASSWORD_LENGTH."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidAccount(
            f"The password has {len(password)} characters; use at least {MIN_PASSWORD_LENGTH}.",
            field="password",
        )
    if len(password) > 1024:
        raise InvalidAccount("The password is longer than 1024 characters.", field="password")
    return _hasher.hash(password)


def verify_password(session: Session, user: User, password: str) -> bool:
    """True when the password matches; rehashes in place when argon2's parameters have changed."""
    if not user.password_hash:
        return False
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
        session.add(user)
        session.commit()
    return True


def user_public(user: User) -> UserPublic:
    """The public shape of a user (never the hash)."""
    return UserPublic.model_validate(user, update={"has_password": bool(user.password_hash)})


def create_user(
    session: Session,
    username: str,
    password: str | None = None,
    *,
    is_admin: bool = False,
    max_concurrent_jobs: int | None = None,
) -> User:
    """A new account; without a password the person signs in through a one-time link and sets one."""
    username = username.strip()
    if not _USERNAME.match(username):
        raise InvalidAccount(
            f"The user name {username!r} is not valid: 1 to 100 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit.",
            field="username",
        )
    if session.exec(select(User).where(func.lower(User.username) == username.lower())).first() is not None:
        raise Conflict(f"The user name {username!r} is taken.", field="username")
    if max_concurrent_jobs is not None and max_concurrent_jobs < 0:
        raise InvalidAccount(
            "max_concurrent_jobs must be 0 or more (empty: no cap).", field="max_concurrent_jobs"
        )
    user = User(
        username=username,
        password_hash=hash_password(password) if password else None,
        is_admin=is_admin,
        max_concurrent_jobs=max_concurrent_jobs,
    )
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def get_user(session: Session, user_id: int) -> User:
    """One user, or NotFound."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"User {user_id} does not exist.")
    return user


def list_users(session: Session) -> list[User]:
    """Every account, oldest first."""
    return list(session.exec(select(User).order_by(col(User.id))).all())


def set_password(session: Session, user: User, password: str) -> None:
    """Set or change a password; other browsers signed in as this user are signed out."""
    user.password_hash = hash_password(password)
    session.add(user)
    for row in session.exec(select(BrowserSession).where(BrowserSession.user_id == user.id)).all():
        session.delete(row)
    session.commit()


def authenticate_password(session: Session, username: str, password: str) -> User | None:
    """The active user with this name and password, or None (same answer for a wrong name or password)."""
    user = session.exec(select(User).where(func.lower(User.username) == username.strip().lower())).first()
    if user is None:
        _hasher.hash(password or "x")  # spend the same time as a real check: user names do not leak by timing
        return None
    if not user.is_active or not verify_password(session, user, password):
        return None
    return user


def scope_for(session: Session, user_id: int | None) -> int | None:
    """The owner filter for a user id (as ``owner_scope``): None for the admin or no user, else the id."""
    if user_id is None:
        return None
    user = session.get(User, user_id)
    return None if user is not None and user.is_admin else user_id


def check_job_cap(session: Session, owner_id: int | None) -> None:
    """TooManyJobs when the owner already has as many queued and running jobs as the admin allows."""
    if owner_id is None:
        return
    user = session.get(User, owner_id)
    if user is None or user.max_concurrent_jobs is None:
        return
    active = session.exec(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_id == owner_id, col(Job.status).in_([JobStatus.queued, JobStatus.running]))
    ).one()
    if active >= user.max_concurrent_jobs:
        raise TooManyJobs(
            f"You have {active} queued or running job(s); your limit is {user.max_concurrent_jobs}. "
            "Wait for one to finish or cancel one (the admin sets the limit)."
        )


# ---- API tokens -------------------------------------------------------------------------------


def create_api_token(
    session: Session, user: User, name: str, expires_days: float | None = None, raw: str | None = None
) -> tuple[ApiToken, str]:
    """A new API token for ``user``: the row, and the token itself (shown once, never stored)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidAccount("Give the token a name of 1 to 100 characters (what it is for).", field="name")
    if expires_days is not None and expires_days <= 0:
        raise InvalidAccount("expires_days must be more than 0 (empty: never expires).", field="expires_days")
    raw = raw or new_token()
    assert user.id is not None
    token = ApiToken(
        user_id=user.id,
        name=name,
        prefix=raw[:12],
        token_hash=hash_secret(raw),
        expires_at=utcnow() + timedelta(days=expires_days) if expires_days else None,
    )
    session.add(token)
    session.commit()
    session.refresh(token)
    return token, raw


def list_api_tokens(session: Session, user_id: int) -> list[ApiToken]:
    """A user's tokens, newest first (revoked ones too, marked)."""
    statement = select(ApiToken).where(ApiToken.user_id == user_id).order_by(col(ApiToken.id).desc())
    return list(session.exec(statement).all())


def api_token_public(token: ApiToken) -> ApiTokenPublic:
    """The public shape of a token: its name and prefix, never the token."""
    return ApiTokenPublic.model_validate(token)


def revoke_api_token(session: Session, user: User, token_id: int) -> ApiToken:
    """Revoke one of the user's own tokens; it stops working on the next request."""
    token = session.get(ApiToken, token_id)
    if token is None or token.user_id != user.id:
        raise NotFound(f"Token {token_id} does not exist.")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.add(token)
        session.commit()
        session.refresh(token)
    return token


def user_for_api_token(session: Session, raw: str) -> User | None:
    """The active user a token belongs to, or None when it is unknown, revoked or expired."""
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_secret(raw))).first()
    if token is None or token.revoked_at is not None:
        return None
    now = utcnow()
    expires = _aware(token.expires_at)
    if expires is not None and expires <= now:
        return None
    user = session.get(User, token.user_id)
    if user is None or not user.is_active:
        return None
    last = _aware(token.last_used_at)
    if last is None or now - last > timedelta(minutes=1):  # not a write on every request
        token.last_used_at = now
        session.add(token)
        session.commit()
    return user


# ---- one-time login links and browser sessions -------------------------------------------------


def create_login_token(
    session: Session, user: User, purpose: str = "login", minutes: float | None = None
) -> str:
    """A one-time sign-in token (first start, invitations); returns the token, stores its hash."""
    raw = new_token()
    assert user.id is not None
    lifetime = timedelta(minutes=minutes if minutes is not None else get_settings().login_link_minutes)
    session.add(
        LoginToken(
            user_id=user.id, token_hash=hash_secret(raw), purpose=purpose, expires_at=utcnow() + lifetime
        )
    )
    session.commit()
    return raw


def login_link(base_url: str, raw: str, next_path: str = "/") -> str:
    """The URL that signs a browser in with a login token, then shows ``next_path``."""
    return f"{base_url.rstrip('/')}/login/token?token={quote(raw)}&next={quote(next_path)}"


def redeem_login_token(session: Session, raw: str) -> User | None:
    """The user a login token signs in: a one-time token (then used up) or the admin bootstrap token."""
    settings = get_settings()
    if settings.admin_token and hmac.compare_digest(raw.encode(), settings.admin_token.encode()):
        return session.exec(select(User).where(col(User.is_admin)).order_by(col(User.id))).first()
    row = session.exec(select(LoginToken).where(LoginToken.token_hash == hash_secret(raw))).first()
    if row is None or row.used_at is not None:
        return None
    expires = _aware(row.expires_at)
    if expires is None or expires <= utcnow():
        return None
    row.used_at = utcnow()
    session.add(row)
    session.commit()
    user = session.get(User, row.user_id)
    return user if user is not None and user.is_active else None


def start_session(session: Session, user: User) -> str:
    """A new signed-in browser; returns the cookie value (stored hashed)."""
    raw = secrets.token_urlsafe(32)
    assert user.id is not None
    expires = utcnow() + timedelta(days=get_settings().session_days)
    session.add(BrowserSession(user_id=user.id, token_hash=hash_secret(raw), expires_at=expires))
    session.commit()
    return raw


def user_for_session(session: Session, raw: str) -> User | None:
    """The active user of a session cookie, or None when it is unknown or expired."""
    row = session.exec(select(BrowserSession).where(BrowserSession.token_hash == hash_secret(raw))).first()
    if row is None:
        return None
    expires = _aware(row.expires_at)
    if expires is None or expires <= utcnow():
        return None
    user = session.get(User, row.user_id)
    return user if user is not None and user.is_active else None


def end_session(session: Session, raw: str) -> None:
    """Sign a browser out: its session row is deleted, so the cookie is worthless even if kept."""
    for row in session.exec(
        select(BrowserSession).where(BrowserSession.token_hash == hash_secret(raw))
    ).all():
        session.delete(row)
    session.commit()


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


# ---- bootstrap --------------------------------------------------------------------------------


def ensure_admin(session: Session, settings: Settings | None = None) -> User:
    """Make sure an admin exists (created on first start) and that PEFT_STUDIO_ADMIN_TOKEN is registered.

    Datasets and jobs made before accounts existed (no owner) are given to the admin; an adapter goes to its
    job's owner.
    """
    settings = settings or get_settings()
    admin = session.exec(select(User).where(col(User.is_admin)).order_by(col(User.id))).first()
    if admin is None:
        name = settings.admin_username
        existing = session.exec(select(User).where(User.username == name)).first()
        if existing is not None:
            existing.is_admin = True
            session.add(existing)
            session.commit()
            admin = existing
        else:
            admin = create_user(session, name, is_admin=True)
    for model in (Dataset, Job):
        for row in session.exec(select(model).where(col(model.owner_id).is_(None))).all():  # type: ignore[attr-defined]
            row.owner_id = admin.id
            session.add(row)
    session.flush()
    # An adapter belongs to its job's owner (never silently to the admin): repair any the worker left empty.
    for adapter in session.exec(select(Adapter).where(col(Adapter.owner_id).is_(None))).all():
        job = session.get(Job, adapter.job_id)
        adapter.owner_id = job.owner_id if job is not None else admin.id
        session.add(adapter)
    session.commit()
    if settings.admin_token:
        digest = hash_secret(settings.admin_token)
        if session.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first() is None:
            create_api_token(session, admin, "PEFT_STUDIO_ADMIN_TOKEN", raw=settings.admin_token)
    return admin


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
    if credentials is not None:
        user = await run_in_threadpool(user_for_api_token, session, credentials.credentials)
        if user is None:
            raise Unauthorized(INVALID_TOKEN_MESSAGE)
        request.state.auth_method = "token"
    else:
        raw = request.cookies.get(SESSION_COOKIE)
        user = await run_in_threadpool(user_for_session, session, raw) if raw else None
        if user is None or raw is None:
            raise Unauthorized(SIGN_IN_MESSAGE)
        request.state.auth_method = "session"
        request.state.csrf_token = csrf_token_for(raw)
        if request.method in UNSAFE_METHODS:
            await _check_csrf(request, request.state.csrf_token)
    request.state.user = user


# The largest id a database integer column holds everywhere (Postgres INTEGER); larger ids cannot exist.
MAX_ID = 2**31 - 1


def _refuse_out_of_range_ids(request: Request) -> None:
    """An id in the path beyond any database integer is NotFound, not a database overflow (a 500)."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) > MAX_ID:
            raise NotFound(f"{name.removesuffix('_id').capitalize()} {value} does not exist.")


async def _out_of_range(request: Request, exc: Exception) -> Response:
    message = "A number in the request is beyond what the database holds (ids and counts fit in 32 bits)."
    return JSONResponse({"detail": message}, status_code=422)


def current_user(request: Request) -> User:
    """The signed-in user (set by ``authenticate``)."""
    user = getattr(request.state, "user", None)
    if user is None:
        raise Unauthorized("Sign in first.")
    return user  # type: ignore[no-any-return]


CurrentUser = Annotated[User, Depends(current_user)]


def require_admin(user: CurrentUser) -> User:
    """The signed-in user when they are the admin, else 403."""
    if not user.is_admin:
        raise Forbidden("Only the admin may do this.")
    return user


AdminUser = Annotated[User, Depends(require_admin)]


def owner_scope(user: CurrentUser) -> int | None:
    """The owner filter for this user: None for the admin (sees everything), else their id."""
    return None if user.is_admin else user.id


OwnerScope = Annotated[int | None, Depends(owner_scope)]

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


async def _unauthorized(request: Request, exc: Exception) -> Response:
    return unauthorized_response(request, exc.message if isinstance(exc, StudioError) else "Sign in first.")


def unauthorized_response(request: Request, message: str) -> Response:
    """The answer to a request without valid credentials: 401 for the APIs (OpenAI's error shape on /v1), a
    redirect to /login for pages. Reads only the request's headers (the request gate sends it before any body)."""
    from app.http.gate import error_json

    path = request.url.path
    if is_api_path(path):
        return error_json(path, 401, message, headers={"WWW-Authenticate": "Bearer"})
    if request.headers.get("hx-request") == "true":
        current = urlsplit(request.headers.get("hx-current-url", "/"))
        target = "/login?next=" + quote(safe_next(current.path or "/"))
        return Response(status_code=401, headers={"HX-Redirect": target})
    here = path + (f"?{request.url.query}" if request.url.query else "")
    next_path = here if request.method == "GET" else "/"
    return RedirectResponse("/login?next=" + quote(safe_next(next_path)), status_code=303)


def install(app: FastAPI) -> None:
    """Accounts in the app: the login redirect for pages, start-up bootstrap, the request gate and body cap.

    ``authenticate`` itself is an app-wide dependency (``FastAPI(dependencies=AUTH_DEPENDENCIES)``), so routers
    added by anyone later are covered without doing anything. In front of it, ``RequestGate`` (app/http/gate.py)
    refuses requests without valid credentials before their body is read, and ``BodySizeLimit``
    (app/http/safety.py) stops a body at its limit while it arrives.
    """
    from sqlalchemy.exc import DataError

    from app.http.gate import FiniteJsonNumbers, RequestGate
    from app.http.safety import BodySizeLimit

    app.add_exception_handler(Unauthorized, _unauthorized)
    # Backstop for numbers in queries that overflow the database's integers (SQLite raises OverflowError).
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(DataError, _out_of_range)
    app.add_middleware(FiniteJsonNumbers)  # innermost: holds a JSON body that BodySizeLimit already capped
    app.add_middleware(BodySizeLimit)
    app.add_middleware(RequestGate)  # added last: the outermost layer, so every answer gets its headers


AUTH_DEPENDENCIES: list[Any] = [Depends(authenticate)]


def bootstrap_accounts() -> User:
    """At start: the admin exists and PEFT_STUDIO_ADMIN_TOKEN is registered (see ``ensure_admin``)."""
    from app.core.db import session_scope

    with session_scope() as session:
        admin = ensure_admin(session)
        session.refresh(admin)  # loaded now: the caller reads it after the session is closed
        session.expunge(admin)
        return admin
