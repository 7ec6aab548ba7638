"""Accounts: every route needs credentials, tokens are hashed and revocable, sessions and CSRF, login links,
the per-user job cap, the audit trail, and the safety checks on what users hand us (archives, uploads, models)."""

import hashlib
import io
import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.core.db import get_engine
from app.core.errors import InvalidSpec
from app.core.models import ApiToken, Job, User, utcnow
from app.core.safety import UnsafeArchive, check_base_model, safe_extract_zip
from app.http.auth import SESSION_COOKIE
from app.services.accounts import hash_secret
from tests.conftest import ADMIN_TOKEN, Account
from tests.factories import sst2_bytes

PUBLIC = {"/healthz", "/login", "/login/token", "/register"}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def _upload(
    client: TestClient, headers: dict[str, str] | None = None, rows: int = 40, offset: int = 0
) -> Any:
    files = {"file": ("train.csv", sst2_bytes(rows, offset=offset), "text/csv")}
    response = client.post("/api/v1/datasets", files=files, headers=headers or {})
    assert response.status_code == 201, response.text
    return response.json()


def _signed_in_browser(client: TestClient, token: str = ADMIN_TOKEN) -> str:
    """Turn the client into a cookie-only browser signed in with ``token``; returns the page's CSRF token."""
    client.headers.pop("Authorization", None)
    response = client.get(f"/login/token?token={token}&next=/datasets", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/datasets"
    page = client.get("/datasets")
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, "the page has no CSRF field"
    return match.group(1)


# ---- every route is closed without credentials ----------------------------------------------------


def test_every_route_needs_credentials(client: TestClient) -> None:
    # given: no Authorization header and no cookie
    client.headers.pop("Authorization")
    checked = 0
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        if not isinstance(route.route, APIRoute) or route.path in PUBLIC:
            continue
        for method in sorted(set(route.methods or ()) - {"HEAD"}):
            # when
            response = client.request(method, _concrete(route.path), follow_redirects=False)
            # then: the API answers 401 with a message, pages send the browser to /login
            if route.path.startswith(("/api/", "/v1/")):
                assert response.status_code == 401, f"{method} {route.path}: {response.status_code}"
                body = response.json()
                assert body.get("detail") or body.get("error", {}).get("message")  # /v1: OpenAI's error shape
            else:
                assert response.status_code in (303, 401), f"{method} {route.path}: {response.status_code}"
                if response.status_code == 303:
                    assert response.headers["location"].startswith("/login?next=")
            checked += 1
    assert checked > 30


def test_public_paths_stay_open(client: TestClient) -> None:
    client.headers.pop("Authorization")
    for path in ("/healthz", "/login", "/openapi.json", "/docs", "/static/app.css"):
        assert client.get(path).status_code == 200, path
    schema = client.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_unknown_and_malformed_tokens_get_401(client: TestClient) -> None:
    for header in ("Bearer pst_not-a-real-token", "Bearer ", "Basic YWRtaW46YWRtaW4=", "pst_nobearer"):
        response = client.get("/api/v1/datasets", headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.json()["detail"]


def test_pages_send_a_signed_out_browser_to_login(client: TestClient) -> None:
    client.headers.pop("Authorization")
    response = client.get("/jobs?x=1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=/jobs%3Fx%3D1"
    htmx = client.get("/jobs/1/events", headers={"HX-Request": "true", "HX-Current-URL": "http://t/jobs/1"})
    assert htmx.status_code == 401 and htmx.headers["hx-redirect"] == "/login?next=/jobs/1"


# ---- API tokens -----------------------------------------------------------------------------------


def test_token_is_shown_once_stored_hashed_and_revocation_is_immediate(client: TestClient) -> None:
    # given: a new token
    created = client.post("/api/v1/tokens", json={"name": "laptop"})
    assert created.status_code == 201
    token = created.json()["token"]
    assert token.startswith("pst_") and len(token) > 40
    assert created.json()["prefix"] == token[:12]

    # then: it works, the list never shows it, and the database holds only its sha256
    assert (
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()["username"] == "admin"
    )
    listed = client.get("/api/v1/tokens").json()
    assert token not in json.dumps(listed) and "laptop" in json.dumps(listed)
    with Session(get_engine()) as session:
        row = session.exec(select(ApiToken).where(ApiToken.name == "laptop")).one()
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        for stored in session.exec(select(ApiToken)).all():
            assert token not in json.dumps(stored.model_dump(mode="json"))
    get_engine().dispose()  # flush the WAL so the file read below sees everything
    database = b"".join(
        p.read_bytes() for p in Path(get_engine().url.database or "").parent.glob("studio.db*")
    )
    assert token.encode() not in database and ADMIN_TOKEN.encode() not in database

    # when: it is revoked, the very next request with it is refused
    assert client.delete(f"/api/v1/tokens/{created.json()['id']}").status_code == 204
    refused = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert client.get("/api/v1/tokens").json()["data"][0]["revoked_at"] is not None


def test_expired_token_and_deactivated_user_get_401(client: TestClient, other_user: Account) -> None:
    assert client.get("/api/v1/me", headers=other_user.headers).status_code == 200
    with Session(get_engine()) as session:
        row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_secret(other_user.token))).one()
        row.expires_at = utcnow().replace(year=2000)
        session.add(row)
        session.commit()
    assert client.get("/api/v1/me", headers=other_user.headers).status_code == 401

    fresh = client.post("/api/v1/tokens", json={"name": "x"}, headers=_login_as(client, other_user)).json()
    headers = {"Authorization": f"Bearer {fresh['token']}"}
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    assert client.patch(f"/api/v1/users/{other_user.id}", json={"is_active": False}).status_code == 200
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def _login_as(client: TestClient, account: Account) -> dict[str, str]:
    """Headers of a fresh token of ``account`` made straight in the database (its old one may be expired)."""
    from app.services.accounts import create_api_token

    with Session(get_engine()) as session:
        user = session.get(User, account.id)
        assert user is not None
        _, raw = create_api_token(session, user, "again")
    return {"Authorization": f"Bearer {raw}"}


def test_tokens_of_others_cannot_be_listed_or_revoked(client: TestClient, other_user: Account) -> None:
    mine = client.post("/api/v1/tokens", json={"name": "admin-only"}).json()
    theirs = client.get("/api/v1/tokens", headers=other_user.headers).json()
    assert "admin-only" not in json.dumps(theirs)
    assert client.delete(f"/api/v1/tokens/{mine['id']}", headers=other_user.headers).status_code == 404


# ---- browser sessions, CSRF, login links ----------------------------------------------------------


def test_cookie_post_without_csrf_token_is_403(client: TestClient) -> None:
    csrf = _signed_in_browser(client)
    # when: forms post without the field, and the JSON API is called with the cookie but no header
    assert client.post("/datasets/demo", follow_redirects=False).status_code == 403
    assert (
        client.post("/datasets/demo", data={"csrf_token": "wrong"}, follow_redirects=False).status_code == 403
    )
    assert client.post("/api/v1/tokens", json={"name": "x"}).status_code == 403
    # then: with the token it goes through (form field or header)
    done = client.post("/datasets/demo", data={"csrf_token": csrf}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"].startswith("/datasets/")
    assert (
        client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": csrf}).status_code == 201
    )
    # and: safe requests need no token; the page carries it for htmx too
    assert client.get("/api/v1/datasets").status_code == 200
    assert f'"X-CSRF-Token": "{csrf}"' in client.get("/").text


def test_session_cookie_flags_and_logout(client: TestClient) -> None:
    client.headers.pop("Authorization")
    response = client.get(f"/login/token?token={ADMIN_TOKEN}&next=/", follow_redirects=False)
    cookie = response.headers["set-cookie"]
    assert f"{SESSION_COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie  # development; production adds Secure
    raw = response.cookies[SESSION_COOKIE]
    page = client.get("/")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf and 'data-testid="logout"' in page.text
    assert (
        client.post("/logout", data={"csrf_token": csrf.group(1)}, follow_redirects=False).status_code == 303
    )
    # the old cookie is worthless even if a browser kept it
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, raw)
    assert client.get("/api/v1/me").status_code == 401


def test_password_login_uses_argon2_and_wrong_password_is_refused(
    client: TestClient, other_user: Account
) -> None:
    with Session(get_engine()) as session:
        user = session.get(User, other_user.id)
        assert user is not None and (user.password_hash or "").startswith("$argon2id$")
        assert other_user.password not in (user.password_hash or "")
    client.headers.pop("Authorization")
    wrong = client.post("/login", data={"username": "bob", "password": "nope-nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    right = client.post(
        "/login",
        data={"username": "BOB", "password": other_user.password, "next": "/jobs"},
        follow_redirects=False,
    )
    assert right.status_code == 303 and right.headers["location"] == "/jobs"
    assert client.get("/api/v1/me").json()["username"] == "bob"


def test_one_time_login_link_works_once_and_next_stays_local(client: TestClient, other_user: Account) -> None:
    link = client.post("/api/v1/login-links", json={"user_id": other_user.id, "next": "/adapters"}).json()[
        "url"
    ]
    path = link.split("://", 1)[1].split("/", 1)[1]
    browser = TestClient(client.app)
    first = browser.get("/" + path, follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/adapters"
    assert browser.get("/api/v1/me").json()["username"] == "bob"
    again = TestClient(client.app).get("/" + path, follow_redirects=False)
    assert again.status_code == 401 and "not valid" in again.text
    # a non-admin cannot make links for someone else
    assert (
        client.post("/api/v1/login-links", json={"user_id": 1}, headers=other_user.headers).status_code == 403
    )
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
        response = TestClient(client.app).get(
            "/login/token", params={"token": ADMIN_TOKEN, "next": evil}, follow_redirects=False
        )
        assert response.headers["location"] == "/", evil


def test_admin_invites_a_user_who_sets_a_password(client: TestClient) -> None:
    invited = client.post("/api/v1/users", json={"username": "carol"})
    assert invited.status_code == 201 and invited.json()["user"]["has_password"] is False
    url = invited.json()["invite_url"]
    browser = TestClient(client.app)
    assert browser.get("/" + url.split("/", 3)[3], follow_redirects=False).headers["location"] == "/account"
    page = browser.get("/account")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf and "Set a password" in page.text
    form = {"csrf_token": csrf.group(1), "new_password": "carol-pass-1", "new_password_again": "carol-pass-1"}
    assert browser.post("/account/password", data=form, follow_redirects=False).status_code == 303
    assert client.get(f"/api/v1/users/{invited.json()['user']['id']}").json()["has_password"] is True
    assert client.post("/api/v1/users", json={"username": "Carol"}).status_code == 409
    assert client.post("/api/v1/users", json={"username": "dave", "password": "short"}).status_code == 422


def test_admin_only_routes_are_403_for_users(client: TestClient, other_user: Account) -> None:
    for method, path in (("GET", "/api/v1/users"), ("GET", "/api/v1/audit"), ("POST", "/api/v1/users")):
        assert (
            client.request(method, path, headers=other_user.headers, json={"username": "x"}).status_code
            == 403
        )
    assert client.get("/users", headers=other_user.headers).status_code == 403
    assert client.get("/users").status_code == 200


def test_signup_is_off_by_default(client: TestClient) -> None:
    client.headers.pop("Authorization")
    assert client.get("/register").status_code == 404
    assert client.post("/register", data={"username": "eve", "password": "eve-password"}).status_code == 404


# ---- job cap and audit ----------------------------------------------------------------------------


def test_job_cap_per_user(client: TestClient, make_user: Any) -> None:
    capped = make_user("erin", max_concurrent_jobs=1)
    dataset = _upload(client, capped.headers)
    with Session(get_engine()) as session:
        session.add(Job(name="busy", spec={}, method="lora", base_model="x", owner_id=capped.id))
        session.commit()
    response = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"]}, headers=capped.headers)
    assert response.status_code == 429
    assert "limit is 1" in response.json()["detail"]


def test_audit_trail_records_who_did_what(client: TestClient, other_user: Account) -> None:
    dataset = _upload(client, other_user.headers)
    assert client.delete(f"/api/v1/datasets/{dataset['id']}", headers=other_user.headers).status_code == 204
    events = client.get("/api/v1/audit", params={"object_type": "dataset"}).json()["data"]
    actions = [(e["username"], e["action"], e["object_id"]) for e in events]
    assert ("bob", "delete", dataset["id"]) in actions and ("bob", "create", dataset["id"]) in actions


# ---- what users hand us ---------------------------------------------------------------------------


def _zip(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symbolic link
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _safetensors(shape: tuple[int, ...] = (4, 8)) -> bytes:
    count = 1
    for dim in shape:
        count *= dim
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 4 * count]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * count)


def _adapter_zip(**extra: bytes) -> bytes:
    studio = {"format": "peft-studio-adapter/1", "method": "lora", "task": "sequence-classification",
              "base_model": "bundled/all-MiniLM-L6-v2", "labels": ["0", "1"]}  # fmt: skip
    members = {
        "studio.json": json.dumps(studio).encode(),
        "adapter_config.json": b"{}",
        "adapter_model.safetensors": _safetensors(),
        **extra,
    }
    return _zip(members)


@pytest.mark.parametrize(
    ("members", "symlinks", "reason"),
    [
        ({"../evil.txt": b"x"}, (), "outside"),
        ({"ok/../../evil.txt": b"x"}, (), "outside"),
        ({"/tmp/evil.txt": b"x"}, (), "absolute"),
        ({"studio.json": b"{}"}, ("link",), "symbolic link"),
    ],
)
def test_zip_slip_archives_are_refused(
    tmp_path: Path, members: dict[str, bytes], symlinks: tuple[str, ...], reason: str
) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip(members, symlinks))
    target = tmp_path / "out" / "inner"
    with pytest.raises(UnsafeArchive, match=reason):
        safe_extract_zip(archive, target)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_adapter_import_refuses_zip_slip_and_pickles_and_accepts_a_clean_adapter(
    client: TestClient, other_user: Account
) -> None:
    def send(data: bytes, headers: dict[str, str] | None = None) -> Any:
        files = {"file": ("adapter.zip", data, "application/zip")}
        return client.post("/api/v1/adapters/import", files=files, headers=headers or {})

    slip = send(_adapter_zip(**{"../../escape.txt": b"x"}))
    assert slip.status_code == 422 and "outside" in slip.json()["detail"]
    pickled = send(_adapter_zip(**{"pytorch_model.bin": b"\x80\x04."}))
    assert pickled.status_code == 422 and "pickle" in pickled.json()["detail"]
    assert send(b"not a zip").status_code == 422
    assert (
        client.get("/api/v1/adapters").json()["count"] == 0
        and client.get("/api/v1/jobs").json()["count"] == 0
    )

    imported = send(_adapter_zip(), other_user.headers)
    assert imported.status_code == 201, imported.text
    body = imported.json()
    assert body["trainable_params"] == 32 and body["labels"] == ["0", "1"]
    assert client.get(f"/api/v1/adapters/{body['id']}", headers=other_user.headers).status_code == 200
    download = client.get(f"/api/v1/adapters/{body['id']}/download", headers=other_user.headers)
    assert download.status_code == 200
    assert "adapter_model.safetensors" in zipfile.ZipFile(io.BytesIO(download.content)).namelist()


def test_oversized_uploads_are_refused(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.settings import get_settings

    monkeypatch.setenv("PEFT_STUDIO_MAX_UPLOAD_BYTES", "2000")
    get_settings.cache_clear()
    big = sst2_bytes(200)
    assert len(big) > 2000
    # a body far beyond the cap is refused before it is read (Content-Length) ...
    huge = client.post("/api/v1/datasets", files={"file": ("t.csv", big * 600, "text/csv")})
    assert huge.status_code == 413 and "PEFT_STUDIO_MAX_UPLOAD_BYTES" in huge.json()["detail"]
    # ... and one just beyond it while it is received; nothing is kept either way
    response = client.post("/api/v1/datasets", files={"file": ("t.csv", big, "text/csv")})
    assert response.status_code == 413 and "upload limit" in response.json()["detail"]
    archive = client.post(
        "/api/v1/adapters/import", files={"file": ("a.zip", b"0" * 5000, "application/zip")}
    )
    assert archive.status_code == 413
    assert client.get("/api/v1/datasets").json()["count"] == 0


def test_base_models_load_from_safetensors_without_remote_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.settings import get_settings

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(InvalidSpec, match="safetensors"):
        check_base_model(str(pickled), pickled, {})
    (pickled / "model.safetensors").write_bytes(_safetensors())
    with pytest.raises(InvalidSpec, match="pickle"):  # a dummy safetensors file beside the pickle (issue 15)
        check_base_model(str(pickled), pickled, {})
    (pickled / "pytorch_model.bin").unlink()
    check_base_model(str(pickled), pickled, {})

    custom = {"auto_map": {"AutoModel": "modeling_x.XModel"}}
    with pytest.raises(InvalidSpec, match="own Python code"):
        check_base_model("org/custom", pickled, custom)
    monkeypatch.setenv("PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS", '["org/custom"]')
    get_settings.cache_clear()
    try:
        check_base_model("org/custom", pickled, custom)
    finally:
        get_settings.cache_clear()


# ---- local sign-in: the link printed by `serve` and `peft-studio login-link` ----------------------


def test_serve_prints_a_one_time_link_locally_and_login_link_makes_one(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from typer.testing import CliRunner

    from app.cli import _print_login_link, cli

    # given: a first start on this machine prints a link that signs the browser in as the admin
    _print_login_link("127.0.0.1", 8000)
    printed = capsys.readouterr().out
    link = re.search(r"http://127\.0\.0\.1:8000(/login/token\?token=pst_\S+)", printed)
    assert link, printed
    browser = TestClient(client.app)
    assert browser.get(link.group(1), follow_redirects=False).status_code == 303
    assert browser.get("/api/v1/me").json()["is_admin"] is True

    # when: the admin has a password, a server start prints nothing; `login-link` still makes one on demand
    assert client.patch("/api/v1/users/1", json={"password": "admin-password-1"}).status_code == 200
    _print_login_link("0.0.0.0", 8000)
    assert "login/token" not in capsys.readouterr().out
    result = CliRunner().invoke(cli, ["login-link", "--url", "http://studio.example"])
    assert result.exit_code == 0, result.output
    url = result.output.strip()
    assert url.startswith("http://studio.example/login/token?token=pst_")
    assert TestClient(client.app).get(url.split("example", 1)[1], follow_redirects=False).status_code == 303


def test_a_request_looks_its_credential_up_once(client: TestClient) -> None:
    # given the admin's token, a signed-in browser, and a count of the queries that read a credential
    from sqlalchemy import event

    from app.services.credential_cache import credentials

    client.get("/api/v1/jobs")  # a token's last-use write happens at most once a minute: not in the count
    browser = TestClient(client.app)
    _signed_in_browser(browser)
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = statement.lstrip().upper()
        if text.startswith("SELECT") and ("FROM APITOKEN" in text or "FROM BROWSERSESSION" in text):
            reads.append(statement)

    def reads_of(make_request: Any) -> int:
        before = len(reads)
        assert make_request().status_code == 200
        return len(reads) - before

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        # when each credential, not remembered, comes with one API request, and then with a second one
        credentials.clear()
        first = (reads_of(lambda: client.get("/api/v1/jobs")), reads_of(lambda: browser.get("/api/v1/jobs")))
        again = (reads_of(lambda: client.get("/api/v1/jobs")), reads_of(lambda: browser.get("/api/v1/jobs")))
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)

    # then each credential was read once (the gate's look-up serves the route's sign-in too), and not at all
    # while the studio remembers it
    assert first == (1, 1), reads
    assert again == (0, 0), reads
