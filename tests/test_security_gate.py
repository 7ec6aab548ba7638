"""The request gate (issue 15): no body is read before sign-in, bodies stop at their limit while they arrive,
sign-ins are verified off the event loop and throttled, security headers, API docs in production, NaN/Infinity,
OpenAI's error shape on /v1, unknown fields refused.

The upload probes run over real HTTP against uvicorn serving the app in a thread of this process, so the test
can watch what the server spools: every regular file the process holds open (a spooled upload is an unnamed
temporary file) and every file under the temporary folder and the data folder, sampled while the request runs.
"""

import os
import re
import select as io_select
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.core.db import get_engine
from app.core.errors import TooManyJobs
from app.core.models import AuditEvent, Dataset
from tests.conftest import ADMIN_TOKEN
from tests.factories import sst2_bytes
from tests.studio import free_port

MIB = 1024 * 1024
SENT_BYTES = 48 * MIB  # what each probe pushes; far beyond every limit but the upload cap
BOUNDARY = "gateprobe"


@dataclass
class LiveStudio:
    """The app served by uvicorn in a thread: its URL, data folder and the temporary folder it spools to."""

    url: str
    data_dir: Path
    spool_dir: Path


@pytest.fixture
def live(studio_settings: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveStudio]:
    """uvicorn + the app in a thread; temporary files of this process go to a folder of the test's own."""
    from app.main import create_app

    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield LiveStudio(f"http://127.0.0.1:{server.config.port}", studio_settings, spool)
    server.should_exit = True
    thread.join(timeout=30)


class SpoolMeter:
    """Samples, while a request runs, the bytes this process holds in files: open regular files (unnamed
    spooled uploads included) and files under the watched folders; keeps the largest total seen, and the
    largest growth of the resident memory."""

    def __init__(self, *folders: Path) -> None:
        self.folders = folders
        self.peak_file_bytes = 0
        self.peak_rss_growth = 0
        self._rss_start = self._rss()
        self._baseline = self._file_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _file_bytes(self) -> int:
        seen: dict[tuple[int, int], int] = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                info = os.stat(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if info.st_mode & 0o170000 == 0o100000:  # a regular file
                seen[(info.st_dev, info.st_ino)] = info.st_size
        for folder in self.folders:
            for path in folder.rglob("*"):
                try:
                    info = path.stat()
                except OSError:
                    continue
                if path.is_file():
                    seen[(info.st_dev, info.st_ino)] = info.st_size
        return sum(seen.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_file_bytes = max(self.peak_file_bytes, self._file_bytes() - self._baseline)
            self.peak_rss_growth = max(self.peak_rss_growth, self._rss() - self._rss_start)
            time.sleep(0.01)

    def __enter__(self) -> "SpoolMeter":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_file_bytes = max(self.peak_file_bytes, self._file_bytes() - self._baseline)


def _multipart_chunks(total: int, fields: dict[str, str] | None = None) -> Iterator[bytes]:
    """A multipart body with one file of ``total`` bytes, produced in 1 MiB chunks (sent chunked)."""
    head = "".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in (fields or {}).items()
    )
    yield (
        head + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    yield b"text,label\n"
    line = b"a fine film,1\n" * (MIB // 14)
    sent = 0
    while sent < total:
        yield line
        sent += len(line)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def _json_chunks(total: int) -> Iterator[bytes]:
    """A JSON object whose one string field is ``total`` bytes, in 1 MiB chunks."""
    yield b'{"name": "'
    sent = 0
    while sent < total:
        yield b"x" * MIB
        sent += MIB
    yield b'"}'


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
UPLOADS = [
    ("/api/v1/datasets", MULTIPART, lambda: _multipart_chunks(SENT_BYTES, {"name": "big"})),
    ("/api/v1/adapters/import", MULTIPART, lambda: _multipart_chunks(SENT_BYTES)),
    ("/v1/files", MULTIPART, lambda: _multipart_chunks(SENT_BYTES, {"purpose": "fine-tune"})),
    ("/login", MULTIPART, lambda: _multipart_chunks(SENT_BYTES, {"username": "admin", "password": "x" * 12})),
    ("/api/v1/jobs", {"Content-Type": "application/json"}, lambda: _json_chunks(SENT_BYTES)),
    ("/datasets", MULTIPART, lambda: _multipart_chunks(SENT_BYTES, {"name": "big"})),  # the upload page
]
EXPECTED_REFUSAL = {
    "/login": 413,
    "/datasets": 303,
}  # the sign-in form's body limit; pages redirect to /login


def _post_chunked(url: str, headers: dict[str, str], body: Iterator[bytes]) -> httpx.Response:
    # A generator body makes httpx send Transfer-Encoding: chunked (no Content-Length).
    with httpx.Client(timeout=120) as client:
        return client.post(url, headers=headers, content=body)


# ---- item 1: nothing is read or spooled before sign-in; bodies stop at their limit ---------------------


@pytest.mark.parametrize(("path", "headers", "body"), UPLOADS, ids=[p for p, _, _ in UPLOADS])
def test_chunked_upload_without_credentials_spools_nothing(
    live: LiveStudio, path: str, headers: dict[str, str], body: object
) -> None:
    # given: no credentials, a 48 MiB chunked body
    # when
    with SpoolMeter(live.spool_dir, live.data_dir) as meter:
        response = _post_chunked(live.url + path, headers, body())  # type: ignore[operator]
    # then: the server wrote (or held) nothing near the size of what was sent
    assert meter.peak_file_bytes < 2 * MIB, f"{meter.peak_file_bytes:,} bytes spooled"
    assert meter.peak_rss_growth < SENT_BYTES // 2, f"memory grew by {meter.peak_rss_growth:,} bytes"
    # and: refused (401 on the APIs, a redirect for pages; /login is public and refuses the body as too large)
    assert response.status_code == EXPECTED_REFUSAL.get(path, 401), response.text
    assert response.headers["x-content-type-options"] == "nosniff"
    if path.startswith("/v1/"):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_chunked_upload_over_the_limit_is_cut_off_and_nothing_is_stored(
    live: LiveStudio, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.settings import get_settings

    # given: a signed-in user and an upload cap of 4 MiB
    monkeypatch.setenv("PEFT_STUDIO_MAX_UPLOAD_BYTES", str(4 * MIB))
    get_settings.cache_clear()
    headers = {**MULTIPART, "Authorization": f"Bearer {ADMIN_TOKEN}"}
    # when: 48 MiB arrive chunked
    with SpoolMeter(live.spool_dir, live.data_dir) as meter:
        response = _post_chunked(live.url + "/api/v1/datasets", headers, _multipart_chunks(SENT_BYTES))
    # then: 413 naming the limit; at most about the limit was ever spooled; no dataset exists
    assert response.status_code == 413, response.text
    assert "PEFT_STUDIO_MAX_UPLOAD_BYTES" in response.json()["detail"]
    assert meter.peak_file_bytes < 4 * MIB + 2 * MIB + MIB, f"{meter.peak_file_bytes:,} bytes spooled"
    with Session(get_engine()) as session:
        assert session.exec(select(Dataset)).all() == []
    # and: an upload within the limit still works
    ok = httpx.post(
        live.url + "/api/v1/datasets",
        files={"file": ("train.csv", sst2_bytes(40), "text/csv")},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert ok.status_code == 201, ok.text


def test_json_body_over_its_own_limit_is_413(live: LiveStudio) -> None:
    # given: a signed-in client; the JSON limit (1 MiB by default) is far below the upload limit
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"}
    # when: 48 MiB of JSON arrive chunked
    with SpoolMeter(live.spool_dir, live.data_dir) as meter:
        response = _post_chunked(live.url + "/api/v1/jobs", headers, _json_chunks(SENT_BYTES))
    # then
    assert response.status_code == 413, response.text
    assert "PEFT_STUDIO_MAX_JSON_BYTES" in response.json()["detail"]
    assert meter.peak_rss_growth < SENT_BYTES // 2, f"memory grew by {meter.peak_rss_growth:,} bytes"


def test_declared_length_over_the_limit_is_refused_before_reading(client: TestClient) -> None:
    response = client.post(
        "/api/v1/tokens",
        content=b"{}",
        headers={"Content-Type": "application/json", "Content-Length": "5000000"},
    )
    assert response.status_code == 413
    assert "PEFT_STUDIO_MAX_JSON_BYTES" in response.json()["detail"]


def test_gate_answers_as_the_dependency_did(client: TestClient) -> None:
    # given: no credentials
    client.headers.pop("Authorization")
    # then: JSON 401 on the API, a redirect to /login on pages, htmx told where to go, OpenAI's shape on /v1
    api = client.post("/api/v1/jobs", json={})
    assert api.status_code == 401 and "Sign in first" in api.json()["detail"]
    assert api.headers["www-authenticate"] == "Bearer"
    page = client.get("/datasets?x=1", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/datasets%3Fx%3D1"
    htmx = client.get("/jobs", headers={"HX-Request": "true", "HX-Current-URL": "http://t/jobs"})
    assert htmx.status_code == 401 and htmx.headers["hx-redirect"] == "/login?next=/jobs"
    v1 = client.get("/v1/models", headers={"Authorization": "Bearer pst_not-a-token"})
    assert v1.status_code == 401
    assert v1.json()["error"]["type"] == "authentication_error"
    assert "not valid" in v1.json()["error"]["message"]
    # and: public paths stay public
    assert client.get("/healthz").status_code == 200
    assert client.get("/login").status_code == 200
    assert client.get("/static/app.css").status_code == 200


# ---- item 2: sign-ins are verified off the event loop, and throttled ------------------------------------


def _account(username: str) -> str:
    """A non-admin account with a password; returns the password."""
    from app.core.db import session_scope
    from app.services.accounts import create_user

    password = f"{username}-password-123"
    with session_scope() as session:
        create_user(session, username, password)
    return password


def _login_request(username: str, password: str) -> bytes:
    body = f"username={username}&password={password}&next=/".encode()
    return (
        b"POST /login HTTP/1.1\r\nHost: studio\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def test_healthz_answers_while_sign_ins_are_being_verified(
    live: LiveStudio, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.settings import get_settings

    # given: six wrong-password sign-ins for real accounts (each an argon2 verification), throttling out of the way
    monkeypatch.setenv("PEFT_STUDIO_SIGN_IN_MAX_FAILURES", "100")
    get_settings.cache_clear()
    names = [f"user{i}" for i in range(6)]
    for name in names:
        _account(name)
    host, port = live.url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port))) for _ in names]
    # when: all six are sent at once, then /healthz
    for sock, name in zip(sockets, names, strict=True):
        sock.sendall(_login_request(name, "wrong-password-1"))
    health = httpx.get(live.url + "/healthz", timeout=60)
    # then: /healthz answered while every sign-in was still being verified (none had an answer yet)
    answered, _, _ = io_select.select(sockets, [], [], 0)
    assert health.status_code == 200
    assert answered == [], (
        f"{len(answered)} sign-in(s) answered before /healthz: the hash ran on the event loop"
    )
    # and: every sign-in was answered, refused
    for sock in sockets:
        sock.settimeout(60)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]


def _sign_in(app: object, address: str, username: str, password: str) -> Any:
    browser = TestClient(app, client=(address, 40000), follow_redirects=False)  # type: ignore[arg-type]
    return browser.post("/login", data={"username": username, "password": password, "next": "/"})


def test_sixth_wrong_password_is_refused_with_retry_after_and_audited(client: TestClient) -> None:
    # given: alice, and a guesser at 10.0.0.1
    password = _account("alice")
    _account("bob")
    # when: five wrong passwords
    for _ in range(5):
        assert _sign_in(client.app, "10.0.0.1", "alice", "not-her-password").status_code == 401
    # then: the sixth attempt is refused before it is checked, even with the right password
    refused = _sign_in(client.app, "10.0.0.1", "alice", password)
    assert refused.status_code == 429
    assert 0 < int(refused.headers["retry-after"]) <= 900
    assert "Too many failed sign-ins" in refused.text
    # and: alice is locked out from another address too (per account); bob, elsewhere, signs in as usual
    assert _sign_in(client.app, "10.0.0.2", "alice", password).status_code == 429
    bob = _sign_in(client.app, "10.0.0.3", "bob", "bob-password-123")
    assert bob.status_code == 303 and "peft_studio_session" in bob.headers["set-cookie"]
    # and: the failures and the lock-out are in the audit trail
    with Session(get_engine()) as session:
        actions = [row.action for row in session.exec(select(AuditEvent)).all()]
        failed = session.exec(select(AuditEvent).where(AuditEvent.action == "login-failed")).first()
    assert actions.count("login-failed") == 5
    assert actions.count("login-locked") == 1
    assert failed is not None and "alice" in failed.detail and "10.0.0.1" in failed.detail


def test_one_address_guessing_many_accounts_is_throttled(client: TestClient) -> None:
    # given: five failed sign-ins for five different (unknown) names from one address
    _account("carol")
    for i in range(5):
        assert _sign_in(client.app, "10.9.9.9", f"nobody{i}", "guess-guess").status_code == 401
    # then: that address is refused even for a real account; carol elsewhere is not affected
    assert _sign_in(client.app, "10.9.9.9", "carol", "carol-password-123").status_code == 429
    assert _sign_in(client.app, "10.9.9.8", "carol", "carol-password-123").status_code == 303


def test_successful_sign_in_clears_the_account_count(client: TestClient) -> None:
    password = _account("dave")
    for _ in range(4):
        assert _sign_in(client.app, f"10.1.0.{_}", "dave", "wrong-wrong").status_code == 401
    assert _sign_in(client.app, "10.1.1.1", "dave", password).status_code == 303
    for _ in range(4):  # four more failures: below the limit again, since the success cleared the count
        assert _sign_in(client.app, f"10.1.2.{_}", "dave", "wrong-wrong").status_code == 401
    assert _sign_in(client.app, "10.1.3.1", "dave", password).status_code == 303


# ---- item 3: headers, docs in production, NaN/Infinity, OpenAI's error shape, unknown fields --------------

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    for path in ("/datasets", "/api/v1/jobs", "/login", "/healthz", "/static/app.css", "/api/v1/nope"):
        headers = client.get(path).headers
        csp = headers["content-security-policy"]
        assert "script-src 'self';" in csp and "unsafe-eval" not in csp, (path, csp)
        assert "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
        assert "strict-transport-security" not in headers, path  # plain HTTP: no HSTS
    client.headers.pop("Authorization")
    refused = client.get("/api/v1/jobs")
    assert refused.status_code == 401 and refused.headers["x-content-type-options"] == "nosniff"


def test_hsts_only_over_https(client: TestClient) -> None:
    secure = TestClient(client.app, base_url="https://studio.example", headers=dict(client.headers))
    assert secure.get("/healthz").headers["strict-transport-security"].startswith("max-age=")


def test_templates_run_no_inline_script() -> None:
    # The CSP allows scripts from /static only: an inline <script>, an on*= handler, hx-on (eval) or a
    # javascript: URL in a template would silently stop working in the browser.
    problems = []
    for template in sorted(TEMPLATES.glob("*.html")):
        text = template.read_text()
        for pattern in (r"<script(?![^>]*\bsrc=)[^>]*>", r"\son[a-z]+\s*=", r"hx-on", r"javascript:"):
            problems += [f"{template.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert problems == []


def test_api_docs_need_sign_in_in_production(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.settings import get_settings

    # given: development: the docs are public
    anonymous = TestClient(client.app, follow_redirects=False)
    assert anonymous.get("/docs").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200
    # when: production
    monkeypatch.setenv("PEFT_STUDIO_ENVIRONMENT", "production")
    monkeypatch.setenv("PEFT_STUDIO_SECRET_KEY", "a-real-secret-for-the-test-0123456789")
    get_settings.cache_clear()
    # then: signed out, they send you to sign in; signed in, they are there
    for path in ("/docs", "/openapi.json", "/redoc"):
        response = anonymous.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "PEFT Studio"


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_named(client: TestClient, number: str) -> None:
    body = f'{{"name": "nan", "training": {{"learning_rate": {number}, "epochs": 1}}}}'
    response = client.post("/api/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "training.learning_rate"
    assert "must be a finite number" in response.json()["detail"]
    # the OpenAI layer: a 400 in its shape, naming the parameter
    openai = client.post(
        "/v1/fine_tuning/jobs",
        content=f'{{"model": "x", "training_file": "file-1", "hyperparameters": {{"n_epochs": {number}}}}}',
        headers={"Content-Type": "application/json"},
    )
    assert openai.status_code == 400
    assert openai.json()["error"]["param"] == "hyperparameters.n_epochs"
    assert "must be a finite number" in openai.json()["error"]["message"]


def _assert_openai_error(response: Any, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def test_v1_answers_every_error_in_openai_shape(client: TestClient) -> None:
    from fastapi import FastAPI

    # 401: bad key; 404: unknown route and unknown object; 405: wrong method
    assert _assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)[
        "type"
    ] == ("authentication_error")
    _assert_openai_error(client.get("/v1/no-such-route"), 404)
    _assert_openai_error(client.get("/v1/models/no-such-model"), 404)
    _assert_openai_error(client.delete("/v1/files"), 405)
    # 413: a body over its limit; 422 (as OpenAI: 400): a bad body
    big = client.post(
        "/v1/chat/completions",
        content=b"{}",
        headers={"Content-Type": "application/json", "Content-Length": "9999999"},
    )
    _assert_openai_error(big, 413)
    _assert_openai_error(client.post("/v1/chat/completions", json={"model": 1}), 400)
    # 500: a route that fails unexpectedly
    app: FastAPI = client.app  # type: ignore[assignment]

    def broken() -> None:
        raise RuntimeError("boom")

    def over_cap() -> None:
        raise TooManyJobs("You have 1 queued or running job(s); your limit is 1.")

    # and: 429 and 500 from routes outside the OpenAI router class (the app's handlers answer for /v1 too)
    app.add_api_route("/v1/broken-for-test", broken)
    app.add_api_route("/v1/capped-for-test", over_cap)
    failing = TestClient(app, raise_server_exceptions=False, headers=dict(client.headers))
    error = _assert_openai_error(failing.get("/v1/broken-for-test"), 500)
    assert "boom" not in str(error["message"])
    assert _assert_openai_error(failing.get("/v1/capped-for-test"), 429)["type"] == "rate_limit_error"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/tokens", {"name": "laptop", "expires_in_days": 3}),
        ("/api/v1/login-links", {"next": "/", "user": 1}),
        ("/api/v1/users", {"username": "erin", "admin": True}),
        ("/api/v1/sweeps", {"base_spec": {}, "grid": {}, "nmae": "x"}),
        ("/api/v1/webhooks", {"url": "https://example.com/hook", "event": ["job.succeeded"]}),
    ],
)
def test_unknown_fields_are_refused_by_name(client: TestClient, path: str, body: dict[str, object]) -> None:
    unknown = next(key for key in body if key in {"expires_in_days", "user", "admin", "nmae", "event"})
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    fields = [error["field"] for error in response.json()["errors"]]
    assert unknown in fields, response.json()
    assert "not a field of this request" in response.json()["detail"]


CSP_RECORDER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI} ${event.sourceFile}:${event.lineNumber}`);
});
"""


@pytest.mark.timeout(600)
def test_pages_run_under_the_csp(live: LiveStudio, chromium_path: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    from app.core.models import Job, JobStatus
    from tests.conftest import CHROMIUM_ARGS
    from tests.factories import create_dataset, create_job

    # given: a dataset and a failed job (its page offers Retry, whose button used an eval'd hx-on before)
    with Session(get_engine()) as session:
        dataset = create_dataset(session, sst2_bytes(40))
        job = create_job(session, dataset_id=dataset.id, name="failed one")
        job.status = JobStatus.failed
        session.add(job)
        session.commit()
        dataset_id, job_id = dataset.id, job.id
    pages = [
        "/",
        "/datasets",
        f"/datasets/{dataset_id}",
        "/jobs",
        "/jobs/new",
        f"/jobs/{job_id}",
        "/adapters",
    ]
    pages += [
        "/workers",
        "/compare",
        "/sweeps",
        "/tokens",
        "/account",
        "/users",
        "/webhooks",
        "/datasets/999999",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.add_init_script(CSP_RECORDER)
            page.goto(f"{live.url}/login/token?token={ADMIN_TOKEN}&next=/")
            # when: every page is opened
            for path in pages:
                page.goto(live.url + path)
                page.wait_for_load_state("load")
                # then: the policy blocked nothing, and the CSRF script from /static ran (it wraps fetch)
                assert page.evaluate("window.__cspViolations") == [], path
                assert page.evaluate("window.fetch.toString().includes('X-CSRF-Token')"), path
            # and: Retry (an htmx POST with the CSRF header) opens the new job
            page.goto(f"{live.url}/jobs/{job_id}")
            page.get_by_test_id("retry-job").click()
            expect(page).to_have_url(re.compile(rf"/jobs/(?!{job_id}$)\d+$"))
            assert page.evaluate("window.__cspViolations") == []
        finally:
            browser.close()
    with Session(get_engine()) as session:
        assert len(session.exec(select(Job)).all()) == 2
