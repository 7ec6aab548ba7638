"""Signed-in users remembered for a few seconds (app/services/credential_cache.py): a remembered credential
still stops at the next request when accounts change here or in another process on the same data folder; a
change nobody announced (another host) is seen within ``auth_cache_seconds``; a credential's own expiry holds."""

import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.db import get_engine
from app.core.models import ApiToken, utcnow
from app.services import credential_cache
from app.services.accounts import hash_secret
from tests.conftest import ADMIN_TOKEN, Account

PROJECT = Path(__file__).resolve().parents[1]


def _remembered(client: TestClient, account: Account) -> None:
    """Two requests with the account's token: the second one is answered from memory."""
    for _ in range(2):
        assert client.get("/api/v1/me", headers=account.headers).status_code == 200
    assert credential_cache.credentials.get("token", account.token, utcnow()) is not None


def _token_id(client: TestClient, account: Account) -> int:
    tokens = client.get("/api/v1/tokens", headers=account.headers).json()["data"]
    return int(next(token["id"] for token in tokens if token["name"] == "tests"))


def test_revoking_a_token_or_deactivating_a_user_stops_a_remembered_credential_at_once(
    client: TestClient, make_user: Callable[..., Account]
) -> None:
    # given two users whose tokens the studio remembers
    bob, carol = make_user("bob"), make_user("carol")
    _remembered(client, bob)
    _remembered(client, carol)

    # when bob revokes his token, and the admin deactivates carol
    assert client.delete(f"/api/v1/tokens/{_token_id(client, bob)}", headers=bob.headers).status_code == 204
    assert client.patch(f"/api/v1/users/{carol.id}", json={"is_active": False}).status_code == 200

    # then the very next request with either is refused, and the admin's own token still works
    assert client.get("/api/v1/me", headers=bob.headers).status_code == 401
    assert client.get("/api/v1/me", headers=carol.headers).status_code == 401
    assert client.get("/api/v1/me").status_code == 200


def test_making_a_user_admin_is_seen_at_the_next_request(
    client: TestClient, make_user: Callable[..., Account]
) -> None:
    # given bob, remembered as an ordinary user
    bob = make_user("bob")
    _remembered(client, bob)
    assert client.get("/api/v1/users", headers=bob.headers).status_code == 403

    # when the admin makes him an admin, then his next request may list the users
    assert client.patch(f"/api/v1/users/{bob.id}", json={"is_admin": True}).status_code == 200
    assert client.get("/api/v1/users", headers=bob.headers).status_code == 200


def test_signing_out_ends_a_remembered_session_at_once(client: TestClient) -> None:
    # given a browser signed in with a cookie, remembered
    browser = TestClient(client.app)
    assert browser.get(f"/login/token?token={ADMIN_TOKEN}&next=/", follow_redirects=False).status_code == 303
    page = browser.get("/datasets")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None
    assert browser.get("/api/v1/me").status_code == 200
    cookie = browser.cookies.get("peft_studio_session")
    assert cookie and credential_cache.credentials.get("session", cookie, utcnow()) is not None

    # when it signs out, then the same cookie, sent again, is refused
    assert (
        browser.post("/logout", data={"csrf_token": csrf.group(1)}, follow_redirects=False).status_code == 303
    )
    stolen = TestClient(client.app, cookies={"peft_studio_session": cookie})
    assert stolen.get("/api/v1/me").status_code == 401


def test_a_token_revoked_by_another_process_is_refused_at_once(
    client: TestClient, make_user: Callable[..., Account], studio_settings: Path
) -> None:
    # given bob's token, remembered by this web process
    bob = make_user("bob")
    _remembered(client, bob)
    token_id = _token_id(client, bob)

    # when another process on the same data folder (as the CLI would) revokes it through the services layer
    script = (
        "from app.core.db import session_scope\n"
        "from app.services.accounts import get_user, revoke_api_token\n"
        "with session_scope() as session:\n"
        f"    revoke_api_token(session, get_user(session, {bob.id}), {token_id})\n"
    )
    env = {**os.environ, "PEFT_STUDIO_DATA_DIR": str(studio_settings), "PYTHONPATH": str(PROJECT)}
    subprocess.run([sys.executable, "-c", script], env=env, cwd=PROJECT, check=True, timeout=120)

    # then this process refuses the token at the next request (the epoch file moved; nothing in memory told it)
    assert client.get("/api/v1/me", headers=bob.headers).status_code == 401


def test_a_change_no_process_announced_is_seen_within_the_cache_time(
    client: TestClient, make_user: Callable[..., Account], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given bob's token, remembered
    bob = make_user("bob")
    _remembered(client, bob)

    # when the token is revoked behind the studio's back (plain SQL, as a web process on another host that
    # shares only the database would leave it: no epoch file here moves)
    with get_engine().begin() as connection:
        connection.execute(
            update(ApiToken).where(ApiToken.token_hash == hash_secret(bob.token)).values(revoked_at=utcnow())
        )

    # then the remembered token is still served until the cache time has passed, and refused after it
    assert client.get("/api/v1/me", headers=bob.headers).status_code == 200
    later = credential_cache.time.monotonic() + credential_cache.get_settings().auth_cache_seconds + 0.1
    monkeypatch.setattr(credential_cache.time, "monotonic", lambda: later)
    assert client.get("/api/v1/me", headers=bob.headers).status_code == 401


def test_a_remembered_token_is_refused_once_it_expires(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a token that expires in a day, remembered
    made = client.post("/api/v1/tokens", json={"name": "short", "expires_days": 1})
    assert made.status_code == 201, made.text
    headers = {"Authorization": f"Bearer {made.json()['token']}"}
    for _ in range(2):
        assert client.get("/api/v1/me", headers=headers).status_code == 200

    # when two days have passed (for the gate and the accounts service alike), then it is refused
    from app.http import gate
    from app.services import accounts

    future = utcnow() + timedelta(days=2)
    monkeypatch.setattr(gate, "utcnow", lambda: future)
    monkeypatch.setattr(accounts, "utcnow", lambda: future)
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def test_turning_the_cache_off_looks_every_request_up(
    client: TestClient, make_user: Callable[..., Account], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given auth_cache_seconds 0, when bob's token is used, then nothing is remembered
    monkeypatch.setattr(credential_cache.get_settings(), "auth_cache_seconds", 0.0)
    bob = make_user("bob")
    for _ in range(2):
        assert client.get("/api/v1/me", headers=bob.headers).status_code == 200
    assert credential_cache.credentials.get("token", bob.token, utcnow()) is None
