"""Signed-in users remembered for a few seconds per credential, so a polling page costs no sign-in queries.

Every request to a non-public path is signed in from its bearer token or session cookie. Looked up in the
database each time, that was two queries, a connection checkout and a hop to a worker thread per request: a third
of the web process's work when a hundred viewers poll a job (bench/web_tier.py, issue 20). Here a credential that
was valid is remembered, by its sha256 and the database it was checked against, for ``auth_cache_seconds``
(default 5 s; 0 turns the cache off):

- **Any change to accounts empties it at once, in every web process on this machine.** A commit that changes a
  user (deactivated, made or unmade admin, password set), deletes a browser session (sign-out) or revokes a
  token or changes its expiry bumps an *epoch* file in the data folder (``auth.epoch``); an entry is only used
  while the epoch it was filled under is still the current one (a ``stat`` per request). The CLI and the web
  share the data folder, so a token revoked from the command line stops working at once too.
- **Web processes on other hosts** (Postgres deployments that share no data folder) see such a change within
  ``auth_cache_seconds``: that is the bound on how long a revoked credential can still be used there.
- An entry never outlives its credential: a token's or session's own expiry is kept with it and checked on use.
- Only credentials that were valid are remembered; an unknown token costs the lookup every time.

The user handed out is a fresh detached copy per request, so no two requests share an ORM object.
"""

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import make_transient_to_detached

from app.core.models import ApiToken, BrowserSession, User
from app.core.settings import get_settings

EPOCH_FILE = "auth.epoch"
MAX_ENTRIES = 10_000
# Token columns whose change can end a token's validity (its last-use time, written once a minute, cannot).
_TOKEN_VALIDITY = ("revoked_at", "expires_at", "user_id", "token_hash")


@dataclass(frozen=True)
class _Entry:
    values: dict[str, Any]
    credential_expires: datetime | None
    epoch: tuple[int, int]
    until: float


@lru_cache(maxsize=16)
def _resolved(data_dir: Path, database_url: str | None) -> tuple[Path, str]:
    """The epoch file and the database URL of the current settings, whose ``data_dir`` and ``database_url`` are
    the key (the settings resolve a path with syscalls; this runs on every request)."""
    settings = get_settings()
    return settings.resolved_data_dir / EPOCH_FILE, settings.resolved_database_url


def _epoch_path() -> Path:
    settings = get_settings()
    return _resolved(settings.data_dir, settings.database_url)[0]


def current_epoch() -> tuple[int, int]:
    """The epoch file's (mtime in ns, inode); (0, 0) before any change to accounts."""
    try:
        stat = os.stat(_epoch_path())
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_ino)


def bump_epoch() -> None:
    """Mark every remembered credential, in every process on this data folder, as stale."""
    path = _epoch_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time_ns()
    temporary = path.with_name(f"{EPOCH_FILE}.{os.getpid()}.{threading.get_ident()}")
    temporary.write_text(str(now))
    os.utime(temporary, ns=(now, now))
    os.replace(temporary, path)


class CredentialCache:
    """Valid credentials by (database, kind, sha256 of the raw value); thread-safe."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(kind: str, raw: str) -> tuple[str, str, str]:
        # only a dictionary key (never stored), so the raw credential is not kept in memory; accounts.hash_secret
        # is not imported: accounts imports this module for its listeners (tests/test_layout.py: no cycles)
        digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()
        settings = get_settings()
        return (_resolved(settings.data_dir, settings.database_url)[1], kind, digest)

    def get(self, kind: str, raw: str, now: datetime) -> User | None:
        """A detached copy of the user this credential signed in within the last few seconds, if nothing about
        accounts has changed since; None when it must be looked up."""
        if get_settings().auth_cache_seconds <= 0:
            return None
        key = self._key(kind, raw)
        entry = self._entries.get(key)
        if entry is None:
            return None
        stale = (
            entry.until <= time.monotonic()
            or entry.epoch != current_epoch()
            or (entry.credential_expires is not None and entry.credential_expires <= now)
        )
        if stale:
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            return None
        user = User(**entry.values)
        make_transient_to_detached(user)
        return user

    def put(
        self, kind: str, raw: str, user: User, credential_expires: datetime | None, epoch: tuple[int, int]
    ) -> None:
        """Remember a credential that signed ``user`` in; ``epoch`` is the one read *before* the lookup (a change
        committed during the lookup then makes the entry stale at once)."""
        ttl = get_settings().auth_cache_seconds
        if ttl <= 0:
            return
        values = {column.key: getattr(user, column.key) for column in inspect(User).column_attrs}
        entry = _Entry(values, credential_expires, epoch, time.monotonic() + ttl)
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[self._key(kind, raw)] = entry

    def clear(self) -> None:
        """Forget every credential (this process only; ``bump_epoch`` reaches the others)."""
        with self._lock:
            self._entries.clear()


credentials = CredentialCache()


def _changes_accounts(session: OrmSession) -> bool:
    for row in session.deleted:
        if isinstance(row, User | ApiToken | BrowserSession):
            return True
    for row in session.dirty:
        if isinstance(row, User) and session.is_modified(row):
            return True
        if isinstance(row, ApiToken):
            state = inspect(row)
            if any(state.attrs[name].history.has_changes() for name in _TOKEN_VALIDITY):
                return True
    return False


@event.listens_for(OrmSession, "before_flush")
def _note_account_changes(session: OrmSession, _context: Any, _instances: Any) -> None:
    if _changes_accounts(session):
        session.info["accounts_changed"] = True


@event.listens_for(OrmSession, "after_commit")
def _bump_after_commit(session: OrmSession) -> None:
    if session.info.pop("accounts_changed", False):
        credentials.clear()
        bump_epoch()


@event.listens_for(OrmSession, "after_rollback")
def _forget_on_rollback(session: OrmSession) -> None:
    session.info.pop("accounts_changed", None)
