"""/api/v1/me, /api/v1/login-links and /api/v1/audit: who am I, a browser sign-in link, the audit trail."""

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from app.core.errors import Forbidden
from app.core.models import AuditEventPublic, AuditEventsPublic, UserPublic
from app.http.auth import AdminUser, CurrentUser, safe_next
from app.http.deps import SessionDep
from app.services import audit
from app.services.accounts import create_login_token, get_user, login_link, user_public

router = APIRouter(prefix="/api/v1", tags=["auth"])


class LoginLinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored
    user_id: int | None = Field(
        default=None, description="Whom the link signs in; empty: you (others: admin)."
    )
    next: str = Field(default="/", max_length=500, description="The page the browser shows after signing in.")


class LoginLink(BaseModel):
    url: str = Field(
        description="Open it once in a browser; it stops working after one use or when it expires."
    )


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser) -> UserPublic:
    """The signed-in user."""
    return user_public(user)


@router.post("/login-links", response_model=LoginLink)
def make_login_link(
    request: Request, session: SessionDep, user: CurrentUser, body: LoginLinkRequest
) -> LoginLink:
    """A one-time link that signs a browser in (for you, or for another user when you are the admin)."""
    target = user
    if body.user_id is not None and body.user_id != user.id:
        if not user.is_admin:
            raise Forbidden("Only the admin may make sign-in links for other users.", field="user_id")
        target = get_user(session, body.user_id)
    raw = create_login_token(session, target)
    audit.record(session, user, "login-link", "user", target.id)
    return LoginLink(url=login_link(str(request.base_url), raw, safe_next(body.next)))


@router.get("/audit", response_model=AuditEventsPublic)
def list_audit(
    session: SessionDep,
    _: AdminUser,
    offset: int = 0,
    limit: int = 100,
    user_id: int | None = None,
    object_type: str | None = None,
    object_id: int | None = None,
) -> AuditEventsPublic:
    """Who created, cancelled, downloaded, deleted what, newest first (admin only)."""
    rows, count = audit.list_events(
        session, max(offset, 0), min(max(limit, 1), 1000), user_id, object_type, object_id
    )
    return AuditEventsPublic(data=[AuditEventPublic.model_validate(row) for row in rows], count=count)
