"""/api/v1/users (admin): create and invite users, cap their concurrent jobs, deactivate them."""

from datetime import datetime, timedelta

from fastapi import APIRouter, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import select

from app.core.errors import Conflict
from app.core.models import BrowserSession, UserPublic, UsersPublic, utcnow
from app.core.settings import get_settings
from app.http.auth import AdminUser
from app.http.deps import SessionDep
from app.services import audit
from app.services.accounts import (
    create_login_token,
    create_user,
    get_user,
    hash_password,
    list_users,
    login_link,
    user_public,
)

router = APIRouter(prefix="/api/v1/users", tags=["users"])


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored
    username: str = Field(min_length=1, max_length=100, description="Letters, digits, '_', '.', '@', '-'.")
    password: str | None = Field(
        default=None,
        max_length=1024,
        description="At least 8 characters; empty: the answer has an invite link.",
    )
    is_admin: bool = False
    max_concurrent_jobs: int | None = Field(default=None, ge=0, description="Queued + running jobs at once.")


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored
    password: str | None = Field(default=None, max_length=1024, description="A new password (8+ characters).")
    is_active: bool | None = Field(
        default=None, description="False signs the user out and refuses their tokens."
    )
    is_admin: bool | None = None
    max_concurrent_jobs: int | None = Field(default=None, ge=0, description="Queued + running jobs at once.")
    clear_job_cap: bool = Field(default=False, description="True removes the cap on concurrent jobs.")


class Invitation(BaseModel):
    user: UserPublic
    invite_url: str | None = Field(description="A one-time link that signs the user in to set a password.")
    expires_at: datetime | None


def _invite(request: Request, session: SessionDep, user_id: int) -> tuple[str, datetime]:
    user = get_user(session, user_id)
    raw = create_login_token(session, user, purpose="invite")
    minutes = get_settings().login_link_minutes
    return login_link(str(request.base_url), raw, "/account"), utcnow() + timedelta(minutes=minutes)


@router.get("", response_model=UsersPublic)
def list_all_users(session: SessionDep, _: AdminUser) -> UsersPublic:
    """Every account (admin only)."""
    rows = list_users(session)
    return UsersPublic(data=[user_public(row) for row in rows], count=len(rows))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Invitation)
def create_account(request: Request, session: SessionDep, admin: AdminUser, body: UserCreate) -> Invitation:
    """Create a user (admin only); without a password the answer carries a one-time invite link."""
    user = create_user(
        session,
        body.username,
        body.password or None,
        is_admin=body.is_admin,
        max_concurrent_jobs=body.max_concurrent_jobs,
    )
    audit.record(session, admin, "create", "user", user.id, user.username)
    url, expires = (None, None) if body.password else _invite(request, session, user.id or 0)
    return Invitation(user=user_public(user), invite_url=url, expires_at=expires)


@router.get("/{user_id}", response_model=UserPublic)
def get_account(session: SessionDep, _: AdminUser, user_id: int) -> UserPublic:
    """One account (admin only)."""
    return user_public(get_user(session, user_id))


@router.patch("/{user_id}", response_model=UserPublic)
def update_account(session: SessionDep, admin: AdminUser, user_id: int, body: UserUpdate) -> UserPublic:
    """Change a user's password, job cap, admin flag or active flag (admin only)."""
    user = get_user(session, user_id)
    if user.id == admin.id and (body.is_active is False or body.is_admin is False):
        raise Conflict("You cannot deactivate or demote yourself; another admin can.", field="is_admin")
    if body.password is not None:
        user.password_hash = hash_password(body.password)
    if body.is_active is not None:
        user.is_active = body.is_active
    if body.is_admin is not None:
        user.is_admin = body.is_admin
    if body.max_concurrent_jobs is not None:
        user.max_concurrent_jobs = body.max_concurrent_jobs
    if body.clear_job_cap:
        user.max_concurrent_jobs = None
    session.add(user)
    if body.is_active is False or body.password is not None:
        for row in session.exec(select(BrowserSession).where(BrowserSession.user_id == user.id)).all():
            session.delete(row)
    session.commit()
    session.refresh(user)
    changed = ", ".join(k for k, v in body.model_dump(exclude={"password"}).items() if v not in (None, False))
    audit.record(session, admin, "update", "user", user.id, changed + (", password" if body.password else ""))
    return user_public(user)


@router.post("/{user_id}/invite", response_model=Invitation)
def invite_again(request: Request, session: SessionDep, admin: AdminUser, user_id: int) -> Invitation:
    """A new one-time sign-in link for a user (admin only), e.g. when they forgot their password."""
    url, expires = _invite(request, session, user_id)
    audit.record(session, admin, "invite", "user", user_id)
    return Invitation(user=user_public(get_user(session, user_id)), invite_url=url, expires_at=expires)
