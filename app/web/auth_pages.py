"""Pages for accounts: sign in (password or one-time link), sign out, your account (password, Hugging Face
token for gated models), your API tokens, and the admin's user list (create, invite, cap concurrent jobs, deactivate).

Every form here posts back with the CSRF field (``csrf_input()``); the sign-in forms are public and need none
(SameSite=Lax cookies are not sent on cross-site posts, and signing in as yourself gains an attacker nothing).
"""

from contextlib import AbstractContextManager
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from app.core.errors import Conflict
from app.core.models import User
from app.core.settings import get_settings
from app.http import ratelimit
from app.http.auth import (
    SESSION_COOKIE,
    AdminUser,
    CurrentUser,
    clear_session_cookie,
    safe_next,
    set_session_cookie,
)
from app.http.deps import SessionDep
from app.services import audit
from app.services import model_downloads as hub_tokens
from app.services.accounts import (
    InvalidAccount,
    api_token_public,
    authenticate_password,
    create_api_token,
    create_login_token,
    create_user,
    end_session,
    get_user,
    list_api_tokens,
    list_users,
    login_link,
    redeem_login_token,
    revoke_api_token,
    set_password,
    start_session,
    user_for_session,
    user_public,
    verify_password,
)
from app.web.render import form_errors, render

router = APIRouter(include_in_schema=False)


def _form_text(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _signed_in(request: Request, session: Session, user: User, next_path: str) -> Response:
    raw = start_session(session, user)
    response = RedirectResponse(safe_next(next_path), status_code=303)
    set_session_cookie(response, raw)
    return response


def _login_page(
    request: Request, next_path: str, error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    context = {
        "nav": "login",
        "next": safe_next(next_path),
        "error": error,
        "allow_signup": get_settings().allow_signup,
    }
    return render(request, "login.html", context, status_code=status_code)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, session: SessionDep, next: str = "/") -> Response:
    """The sign-in form (a signed-in browser goes straight on)."""
    raw = request.cookies.get(SESSION_COOKIE)
    if raw and user_for_session(session, raw) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, next)


@router.post("/login")
async def login(request: Request, session: SessionDep) -> Response:
    """Check the user name and password; on success a session cookie, then the page asked for.

    argon2 takes a third of a second of CPU: it runs in a thread, so the event loop (every other request)
    goes on meanwhile. Failed sign-ins are throttled per account and per address (app/http/ratelimit.py).
    """
    form = await request.form()
    username, password = _form_text(form, "username"), form.get("password")
    next_path = _form_text(form, "next") or "/"
    address = request.client.host if request.client else "unknown"
    wait = await run_in_threadpool(ratelimit.retry_after, session, username, address)
    if wait is not None:
        minutes = max(1, round(wait / 60))
        message = (
            f"Too many failed sign-ins for this account or from this address; try again in about {minutes} "
            f"minute{'s' if minutes != 1 else ''}."
        )
        page = _login_page(request, next_path, message, 429)
        page.headers["Retry-After"] = str(wait)
        return page
    user = await run_in_threadpool(
        authenticate_password, session, username, password if isinstance(password, str) else ""
    )
    if user is None:
        await run_in_threadpool(ratelimit.record_failure, session, username, address)
        return _login_page(request, next_path, "Wrong user name or password.", 401)
    await run_in_threadpool(ratelimit.clear_account, session, username)
    audit.record(session, user, "login", "user", user.id, "password")
    return _signed_in(request, session, user, next_path)


@router.get("/login/token")
def login_with_token(request: Request, session: SessionDep, token: str = "", next: str = "/") -> Response:
    """A one-time sign-in link (first start, invitations) or the admin's bootstrap token: sign in, go on."""
    user = redeem_login_token(session, token) if token else None
    if user is None:
        message = (
            "This sign-in link is not valid: it was used already, it expired, or it was cut short. "
            "Ask for a new one (the admin, or `peft-studio login-link` on the server)."
        )
        return _login_page(request, next, message, 401)
    audit.record(session, user, "login", "user", user.id, "link")
    return _signed_in(request, session, user, next)


@router.post("/logout")
def logout(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    """Sign this browser out (its session is deleted on the server)."""
    raw = request.cookies.get(SESSION_COOKIE)
    if raw:
        end_session(session, raw)
    audit.record(session, user, "logout", "user", user.id)
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookie(response)
    return response


@router.get("/register", response_class=HTMLResponse)
def register_page(request: Request) -> HTMLResponse:
    """Self-registration, when the admin allows it (PEFT_STUDIO_ALLOW_SIGNUP)."""
    if not get_settings().allow_signup:
        return render(
            request, "error.html", {"status_code": 404, "message": "Ask the admin for an account."}, 404
        )
    return render(request, "login.html", {"nav": "login", "register": True, "next": "/", "error": None})


@router.post("/register")
async def register(request: Request, session: SessionDep) -> Response:
    """Create an account and sign in (only when PEFT_STUDIO_ALLOW_SIGNUP is on)."""
    if not get_settings().allow_signup:
        return render(
            request, "error.html", {"status_code": 404, "message": "Ask the admin for an account."}, 404
        )
    form = await request.form()
    password = form.get("password")
    with form_errors(
        "login.html", lambda error: {"nav": "login", "register": True, "next": "/", "error": error.message}
    ):
        if not isinstance(password, str) or not password:
            raise InvalidAccount("Choose a password.", field="password")
        user = await run_in_threadpool(create_user, session, _form_text(form, "username"), password)
    audit.record(session, user, "create", "user", user.id, "self-registration")
    return _signed_in(request, session, user, "/")


# ---- your account -----------------------------------------------------------------------------


def _account_context(
    session: Session, user: User, error: str | None = None, token_error: str | None = None
) -> dict[str, Any]:
    return {
        "nav": "account",
        "account": user_public(user),
        "message": None,
        "error": error,
        "token_error": token_error,
        "token_saved": hub_tokens.has_hub_token(session, user.id),
    }


@router.get("/account", response_class=HTMLResponse)
def account_page(request: Request, session: SessionDep, user: CurrentUser) -> HTMLResponse:
    """Your account: name, role, job cap, the password form and your Hugging Face token."""
    return render(request, "account.html", _account_context(session, user))


@router.post("/account/password")
async def change_password(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    """Set a first password (after an invitation) or change it (the current one is asked)."""
    form = await request.form()
    current, new, again = (form.get(k) for k in ("current_password", "new_password", "new_password_again"))
    with form_errors("account.html", lambda error: _account_context(session, user, error.message)):
        if user.password_hash and not await run_in_threadpool(
            verify_password, session, user, current if isinstance(current, str) else ""
        ):
            raise InvalidAccount("The current password is wrong.", field="current_password")
        if not isinstance(new, str) or new != again:
            raise InvalidAccount("The two new passwords differ.", field="new_password")
        await run_in_threadpool(set_password, session, user, new)
    audit.record(session, user, "update", "user", user.id, "password")
    # Setting a password signs every browser out; sign this one in again.
    response = RedirectResponse("/account?saved=1", status_code=303)
    set_session_cookie(response, start_session(session, user))
    return response


@router.post("/account/hub-token", response_model=None)
async def save_hub_token(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    """Save (or replace) your Hugging Face token for gated models; stored encrypted, never shown again."""
    form = await request.form()
    with form_errors(
        "account.html", lambda error: _account_context(session, user, token_error=error.message)
    ):
        hub_tokens.save_hub_token(session, user, _form_text(form, "token"))
    return RedirectResponse("/account?token=saved", status_code=303)


@router.post("/account/hub-token/delete", response_model=None)
def forget_hub_token(session: SessionDep, user: CurrentUser) -> Response:
    """Forget your Hugging Face token."""
    hub_tokens.delete_hub_token(session, user)
    return RedirectResponse("/account?token=forgotten", status_code=303)


# ---- API tokens -------------------------------------------------------------------------------


def _tokens_page(
    request: Request,
    session: Session,
    user: User,
    created: str | None = None,
    error: str | None = None,
    code: int = 200,
) -> HTMLResponse:
    return render(request, "tokens.html", _tokens_context(session, user, created, error), code)


def _tokens_context(
    session: Session, user: User, created: str | None = None, error: str | None = None
) -> dict[str, Any]:
    tokens = [api_token_public(t) for t in list_api_tokens(session, user.id or 0)]
    return {"nav": "tokens", "tokens": tokens, "created": created, "error": error}


@router.get("/tokens", response_class=HTMLResponse)
def tokens_page(request: Request, session: SessionDep, user: CurrentUser) -> HTMLResponse:
    """Your API tokens, and a form to make one."""
    return _tokens_page(request, session, user)


@router.post("/tokens", response_class=HTMLResponse)
async def create_token(request: Request, session: SessionDep, user: CurrentUser) -> HTMLResponse:
    """Make a token and show it once."""
    form = await request.form()
    days_text = _form_text(form, "expires_days")
    try:
        days = float(days_text) if days_text else None
    except ValueError:
        return _tokens_page(request, session, user, error="Expires in: a number of days, or empty.", code=422)
    with form_errors("tokens.html", lambda error: _tokens_context(session, user, error=error.message)):
        token, raw = create_api_token(session, user, _form_text(form, "name"), days)
    audit.record(session, user, "create", "token", token.id, token.name)
    return _tokens_page(request, session, user, created=raw, code=201)


@router.post("/tokens/{token_id}/revoke")
def revoke_token(request: Request, session: SessionDep, user: CurrentUser, token_id: int) -> Response:
    """Revoke one of your tokens."""
    token = revoke_api_token(session, user, token_id)
    audit.record(session, user, "revoke", "token", token.id, token.name)
    return RedirectResponse("/tokens", status_code=303)


# ---- users (admin) ----------------------------------------------------------------------------


def _users_page(
    request: Request, session: Session, invite: str | None = None, code: int = 200
) -> HTMLResponse:
    return render(request, "users.html", _users_context(session, invite), code)


def _users_context(session: Session, invite: str | None = None, error: str | None = None) -> dict[str, Any]:
    users = [user_public(u) for u in list_users(session)]
    return {"nav": "users", "users": users, "invite": invite, "error": error}


def _users_form_errors(session: Session) -> AbstractContextManager[None]:
    """A failed form on the users page shows the page again with the message."""
    return form_errors("users.html", lambda error: _users_context(session, error=error.message))


@router.get("/users", response_class=HTMLResponse)
def users_page(request: Request, session: SessionDep, _: AdminUser) -> HTMLResponse:
    """Every account, with forms to create or invite users and cap their concurrent jobs (admin only)."""
    return _users_page(request, session)


def _cap(text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise InvalidAccount(
            "Job cap: a whole number of jobs, or empty for no cap.", field="max_concurrent_jobs"
        )
    return int(text)


@router.post("/users", response_class=HTMLResponse)
async def create_account(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    """Create a user; without a password the page shows a one-time invite link to hand over."""
    form = await request.form()
    password = form.get("password")
    with _users_form_errors(session):
        user = await run_in_threadpool(
            lambda: create_user(
                session,
                _form_text(form, "username"),
                password if isinstance(password, str) and password else None,
                is_admin=form.get("is_admin") == "on",
                max_concurrent_jobs=_cap(_form_text(form, "max_concurrent_jobs")),
            )
        )
    audit.record(session, admin, "create", "user", user.id, user.username)
    invite = None
    if not user.password_hash:
        invite = login_link(str(request.base_url), create_login_token(session, user, "invite"), "/account")
    return _users_page(request, session, invite=invite, code=201)


@router.post("/users/{user_id}", response_class=HTMLResponse)
async def update_account(request: Request, session: SessionDep, admin: AdminUser, user_id: int) -> Response:
    """Change a user's job cap or active flag."""
    form = await request.form()
    user = get_user(session, user_id)
    with _users_form_errors(session):  # checked before the row changes, so a refusal leaves it as it was
        cap = _cap(_form_text(form, "max_concurrent_jobs"))
        active = form.get("is_active") == "on"
        if user.id == admin.id and not active:
            raise Conflict("You cannot deactivate yourself.")
    user.max_concurrent_jobs = cap
    user.is_active = active
    session.add(user)
    session.commit()
    audit.record(
        session, admin, "update", "user", user.id, f"cap={user.max_concurrent_jobs} active={user.is_active}"
    )
    return RedirectResponse("/users", status_code=303)


@router.post("/users/{user_id}/invite", response_class=HTMLResponse)
def invite(request: Request, session: SessionDep, admin: AdminUser, user_id: int) -> HTMLResponse:
    """A new one-time sign-in link for a user (e.g. a forgotten password)."""
    user = get_user(session, user_id)
    link = login_link(str(request.base_url), create_login_token(session, user, "invite"), "/account")
    audit.record(session, admin, "invite", "user", user.id)
    return _users_page(request, session, invite=link)
