"""Sign-in throttling: after PEFT_STUDIO_SIGN_IN_MAX_FAILURES failed sign-ins within
PEFT_STUDIO_SIGN_IN_WINDOW_SECONDS, for one account or from one client address, further attempts are refused
(429 with ``Retry-After``) until the oldest failure leaves the window.

Failures are rows in the database (``SignInFailure``), so every web process counts the same ones. Both keys are
checked before the password is verified, so a locked-out guesser costs the server no argon2 work. A successful
sign-in clears its account's failures, not its address's (one attacker with an account of their own could
otherwise clear the count for the address they guess from). Concurrent attempts may each pass the check before
any failure is written, so a burst can overshoot the limit by the number of attempts in flight; the next ones
are refused. Blocking functions: call them in a thread from async code.
"""

from datetime import timedelta

from sqlmodel import Session, col, delete, select

from app.core.models import SignInFailure, utcnow
from app.core.settings import get_settings
from app.services import audit


def _keys(username: str, address: str) -> list[str]:
    return [f"account:{username.strip().lower()[:150]}", f"address:{address[:150]}"]


def retry_after(session: Session, username: str, address: str) -> int | None:
    """Seconds until a sign-in for this account from this address may be tried again; None when it may now."""
    settings = get_settings()
    now = utcnow()
    since = now - timedelta(seconds=settings.sign_in_window_seconds)
    wait = 0.0
    for key in _keys(username, address):
        times = session.exec(
            select(SignInFailure.failed_at)
            .where(SignInFailure.key == key, col(SignInFailure.failed_at) > since)
            .order_by(col(SignInFailure.failed_at).desc())
            .limit(settings.sign_in_max_failures)
        ).all()
        if len(times) >= settings.sign_in_max_failures:
            oldest = times[-1] if times[-1].tzinfo else times[-1].replace(tzinfo=now.tzinfo)
            wait = max(wait, (oldest - since).total_seconds())
    return max(1, int(wait + 0.999)) if wait > 0 else None


def record_failure(session: Session, username: str, address: str) -> bool:
    """Count a failed sign-in for the account and the address, and write it to the audit trail; True when this
    failure locked the account or the address out (also audited, as ``login-locked``)."""
    settings = get_settings()
    session.exec(  # rows older than the window count for nothing
        delete(SignInFailure).where(
            col(SignInFailure.failed_at) < utcnow() - timedelta(seconds=settings.sign_in_window_seconds)
        )
    )
    for key in _keys(username, address):
        session.add(SignInFailure(key=key))
    session.commit()
    audit.record(session, None, "login-failed", "user", None, f"{username[:100]} from {address}")
    wait = retry_after(session, username, address)
    if wait is not None:
        audit.record(
            session,
            None,
            "login-locked",
            "user",
            None,
            f"{username[:100]} from {address}: {settings.sign_in_max_failures} failed sign-ins; "
            f"refused for {wait} s",
        )
    return wait is not None


def clear_account(session: Session, username: str) -> None:
    """Forget an account's failed sign-ins after it signed in successfully."""
    session.exec(delete(SignInFailure).where(col(SignInFailure.key) == _keys(username, "")[0]))
    session.commit()
