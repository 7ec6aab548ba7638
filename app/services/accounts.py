"""Accounts: users and their passwords, API tokens, one-time login links and browser sessions (the rows).

Secrets are never stored in clear: API tokens, one-time login tokens and session tokens are random 256-bit
values of which only the sha256 is kept (a fast hash is enough for high-entropy tokens; argon2 is for
passwords, which people choose). Who is asking in a request, cookies and CSRF are the web side's
(``app/http/auth.py``); this module imports no web framework.
"""

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import Session, col, func, select

from app.core.errors import Conflict, NotFound, StudioError
from app.core.models import (
    Adapter,
    ApiToken,
    ApiTokenPublic,
    BrowserSession,
    Dataset,
    Job,
    LoginToken,
    User,
    UserPublic,
    utcnow,
)
from app.core.settings import Settings, get_settings
from app.services import credential_cache  # noqa: F401  (its listeners note every change to accounts)

TOKEN_PREFIX = "pst_"
MIN_PASSWORD_LENGTH = 8
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")

_hasher = PasswordHasher()


class InvalidAccount(StudioError):
    """A user name, password or token setting that cannot be accepted."""

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
    found = token_sign_in(session, raw)
    return found[0] if found else None


def token_sign_in(session: Session, raw: str) -> tuple[User, datetime | None] | None:
    """The active user a token signs in and when the token expires, or None when it is unknown, revoked or
    expired."""
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
    return user, expires


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
    found = session_sign_in(session, raw)
    return found[0] if found else None


def session_sign_in(session: Session, raw: str) -> tuple[User, datetime] | None:
    """The active user a session cookie signs in and when the session expires, or None when it is unknown or
    expired."""
    row = session.exec(select(BrowserSession).where(BrowserSession.token_hash == hash_secret(raw))).first()
    if row is None:
        return None
    expires = _aware(row.expires_at)
    if expires is None or expires <= utcnow():
        return None
    user = session.get(User, row.user_id)
    return (user, expires) if user is not None and user.is_active else None


def end_session(session: Session, raw: str) -> None:
    """Sign a browser out: its session row is deleted, so the cookie is worthless even if kept."""
    for row in session.exec(
        select(BrowserSession).where(BrowserSession.token_hash == hash_secret(raw))
    ).all():
        session.delete(row)
    session.commit()


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


def bootstrap_accounts() -> User:
    """At start: the admin exists and PEFT_STUDIO_ADMIN_TOKEN is registered (see ``ensure_admin``)."""
    from app.core.db import session_scope

    with session_scope() as session:
        admin = ensure_admin(session)
        session.refresh(admin)  # loaded now: the caller reads it after the session is closed
        session.expunge(admin)
        return admin
