"""Outbound requests users can aim (issue 15): webhooks and MLflow URIs never reach the studio's own network.

The address table goes through the API (a 422 naming the field); delivery-time checks (DNS answers that
change, redirects) run the dispatcher in-process against loopback servers. Name resolution is replaced only
where a test needs a name to point somewhere (``app.core.netguard.resolve``); everything else is real.
Also here: the submit-time flag on a job that no connected worker can run (``waiting_reason``).
"""

import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlmodel import Session

from app.core import netguard
from app.core.models import JobStatus, Worker, utcnow
from app.services.webhooks import dispatch_once
from tests.factories import create_dataset, create_job, sst2_bytes

SECRET_BODY = "SECRET-INTERNAL-DATA"


@pytest.fixture
def no_dispatcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The tests drive the dispatcher; retries are immediate."""
    monkeypatch.setenv("PEFT_STUDIO_WEBHOOK_POLL_SECONDS", "0")
    monkeypatch.setenv("PEFT_STUDIO_WEBHOOK_RETRY_BASE_SECONDS", "0.01")
    monkeypatch.setenv("PEFT_STUDIO_WEBHOOK_MAX_ATTEMPTS", "1")
    yield


@pytest.fixture
def allow_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The admin allow-lists 127.0.0.1 (the loopback receivers below)."""
    monkeypatch.setenv("PEFT_STUDIO_OUTBOUND_ALLOWED_HOSTS", "127.0.0.1")
    yield


def allow_hosts(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """The admin's allow-list (PEFT_STUDIO_OUTBOUND_ALLOWED_HOSTS), in effect at once."""
    from app.core.settings import get_settings

    monkeypatch.setenv("PEFT_STUDIO_OUTBOUND_ALLOWED_HOSTS", value)
    get_settings.cache_clear()


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    """Names in ``answers`` resolve to those addresses (which may be changed later); others as usual."""
    system = netguard.resolve

    def resolve(host: str, port: int) -> list[str]:
        return list(answers[host]) if host in answers else system(host, port)

    monkeypatch.setattr(netguard, "resolve", resolve)


@dataclass
class Server:
    """A loopback HTTP server: what it got (path, Host header) and a handler deciding the answer."""

    url: str
    port: int
    answer: Callable[[str], tuple[int, dict[str, str], bytes]]
    requests: list[tuple[str, str]] = field(default_factory=list)


@contextmanager
def http_server(answer: Callable[[str], tuple[int, dict[str, str], bytes]]) -> Iterator[Server]:
    """Run a server on 127.0.0.1 whose answer to a POST on ``path`` is ``answer(path)``."""
    server_state = Server(url="", port=0, answer=answer)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            server_state.requests.append((self.path, self.headers.get("Host", "")))
            status, headers, body = server_state.answer(self.path)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state.port = int(server.server_address[1])
    server_state.url = f"http://127.0.0.1:{server_state.port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        server.shutdown()
        server.server_close()


def _session() -> Session:
    from app.core.db import get_engine

    return Session(get_engine())


def _ping_and_get_delivery(client: Any, hook_id: int) -> dict[str, Any]:
    """Queue a ping, run the dispatcher until its attempt is logged, return the delivery."""
    assert client.post(f"/api/v1/webhooks/{hook_id}/ping").status_code == 202
    for _ in range(100):
        dispatch_once()
        data = client.get(f"/api/v1/webhooks/{hook_id}/deliveries").json()["data"]
        if data and data[0]["attempts"] >= 1:
            return dict(data[0])
        time.sleep(0.05)
    raise AssertionError("the ping was never attempted")


# ---- the address table ---------------------------------------------------------------------------

BLOCKED_URLS = [
    "http://127.0.0.1/hook",
    "http://localhost:8000/hook",
    "http://2130706433/hook",  # 127.0.0.1 as one decimal number
    "http://0x7f.1/hook",  # and in hex shorthand
    "http://[::1]:8080/hook",
    "http://10.0.0.1/hook",
    "http://192.168.1.1/hook",
    "http://172.16.0.1/hook",
    "http://100.64.0.1/hook",  # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/hook",
    "http://0.0.0.0:8000/hook",
    "http://[::ffff:127.0.0.1]/hook",  # IPv4 inside IPv6
    "http://[64:ff9b::a00:1]/hook",  # NAT64 of 10.0.0.1
    "http://224.0.0.1/hook",
    "http://internal.example.test/hook",  # a public-looking name that resolves to loopback
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
def test_webhooks_to_internal_addresses_are_refused_at_creation(
    no_dispatcher: None, client: Any, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    fake_dns(monkeypatch, {"internal.example.test": ["93.184.216.34", "127.0.0.1"]})

    response = client.post("/api/v1/webhooks", json={"url": url})

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "url"
    assert "not allowed" in response.json()["detail"] and "ALLOWED_HOSTS" in response.json()["detail"]
    assert client.get("/api/v1/webhooks").json()["count"] == 0


def test_public_addresses_and_allow_listed_hosts_are_accepted(
    no_dispatcher: None, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"hooks.example.test": ["93.184.216.34"], "ci.internal": ["10.1.2.3"]})
    allow_hosts(monkeypatch, "ci.internal, 192.168.0.0/16")
    for url in (
        "https://hooks.example.test/peft",
        "http://8.8.8.8/hook",
        "https://[2606:4700::1111]/hook",
        "http://ci.internal:9000/hook",  # allow-listed by name
        "http://192.168.7.7/hook",  # inside an allow-listed network
        "https://not-resolvable-now.invalid/hook",  # checked again at every delivery
    ):
        response = client.post("/api/v1/webhooks", json={"url": url})
        assert response.status_code == 201, (url, response.text)
    assert client.post("/api/v1/webhooks", json={"url": "http://10.0.0.1/hook"}).status_code == 422


@pytest.mark.parametrize("url", ["http://[::1/hook", "http://[zz]/x", "http://example.com:99999/x"])
def test_malformed_hosts_and_ports_are_a_422_not_a_500(no_dispatcher: None, client: Any, url: str) -> None:
    response = client.post("/api/v1/webhooks", json={"url": url})

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "url"


def test_address_classification() -> None:
    def problem(address: str) -> str | None:
        return netguard.address_problem(ipaddress.ip_address(address))

    assert problem("8.8.8.8") is None and problem("2606:4700::1111") is None
    assert problem("127.0.0.53") == "a loopback address"
    assert problem("169.254.169.254") == "a cloud metadata address"
    assert problem("fd00:ec2::254") == "a cloud metadata address"
    assert problem("fc00::1") == "a private-network address"
    assert problem("100.100.100.100") == "a carrier-grade NAT address"
    assert problem("2002:7f00:1::") == "a loopback address (inside an IPv6 address)"  # 6to4 of 127.0.0.1


# ---- at delivery -------------------------------------------------------------------------------


def test_a_name_that_turns_internal_after_creation_is_not_sent_to(
    no_dispatcher: None, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with http_server(lambda path: (200, {}, b"ok")) as internal:
        answers = {"rebind.example.test": ["93.184.216.34"]}
        fake_dns(monkeypatch, answers)
        url = f"http://rebind.example.test:{internal.port}/hook"
        hook = client.post("/api/v1/webhooks", json={"url": url}).json()
        # when the name now points at the studio's own machine (DNS rebinding)
        answers["rebind.example.test"] = ["127.0.0.1"]
        delivery = _ping_and_get_delivery(client, hook["id"])

    assert internal.requests == []
    assert delivery["status"] == "failed" and delivery["last_status_code"] is None
    assert delivery["last_error"].startswith("not sent:") and "loopback" in delivery["last_error"]


def test_the_request_goes_to_the_checked_address_with_the_name_in_host(
    no_dispatcher: None, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a name only the studio's check knows (the system resolver cannot resolve it), allow-listed
    allow_hosts(monkeypatch, "hooks.corp.test")
    fake_dns(monkeypatch, {"hooks.corp.test": ["127.0.0.1"]})
    with http_server(lambda path: (204, {}, b"")) as receiver:
        hook = client.post("/api/v1/webhooks", json={"url": f"http://hooks.corp.test:{receiver.port}/in"})
        assert hook.status_code == 201, hook.text
        delivery = _ping_and_get_delivery(client, hook.json()["id"])

    # then the connection went to the address that was checked, and the Host header kept the name
    assert delivery["status"] == "delivered", delivery
    assert receiver.requests == [("/in", f"hooks.corp.test:{receiver.port}")]


def test_a_redirect_to_an_internal_address_is_not_followed(
    no_dispatcher: None, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with http_server(lambda path: (200, {}, SECRET_BODY.encode())) as internal:
        # the receiver is allow-listed by name; the internal service (same machine, other port) is not
        allow_hosts(monkeypatch, "hooks.corp.test")
        fake_dns(monkeypatch, {"hooks.corp.test": ["127.0.0.1"]})

        def redirect(path: str) -> tuple[int, dict[str, str], bytes]:
            return 307, {"Location": f"http://127.0.0.1:{internal.port}/admin"}, b""

        with http_server(redirect) as receiver:
            hook = client.post("/api/v1/webhooks", json={"url": f"http://hooks.corp.test:{receiver.port}/h"})
            delivery = _ping_and_get_delivery(client, hook.json()["id"])

    assert len(receiver.requests) == 1 and internal.requests == []
    assert delivery["status"] == "failed" and "loopback" in delivery["last_error"]
    assert SECRET_BODY not in str(delivery)


def test_an_allow_listed_redirect_is_followed_and_checked(
    no_dispatcher: None, allow_loopback: None, client: Any
) -> None:
    with http_server(lambda path: (200, {}, b"ok")) as final:

        def redirect(path: str) -> tuple[int, dict[str, str], bytes]:
            return 308, {"Location": f"{final.url}/moved"}, b""

        with http_server(redirect) as receiver:
            hook = client.post("/api/v1/webhooks", json={"url": f"{receiver.url}/h"}).json()
            delivery = _ping_and_get_delivery(client, hook["id"])

    assert delivery["status"] == "delivered" and [path for path, _ in final.requests] == ["/moved"]


def test_the_delivery_log_shows_status_codes_not_bodies(
    no_dispatcher: None, allow_loopback: None, client: Any
) -> None:
    with http_server(lambda path: (403, {}, SECRET_BODY.encode())) as internal:
        hook = client.post("/api/v1/webhooks", json={"url": f"{internal.url}/h"}).json()
        delivery = _ping_and_get_delivery(client, hook["id"])

    assert delivery["last_status_code"] == 403 and delivery["last_error"] == "HTTP 403"
    assert SECRET_BODY not in str(delivery)
    page = client.get("/webhooks", headers={"Accept": "text/html"})
    assert SECRET_BODY not in page.text


def test_refused_and_filtered_ports_read_the_same(
    no_dispatcher: None, allow_loopback: None, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from tests.studio import free_port

    # a closed port: connection refused
    closed = client.post("/api/v1/webhooks", json={"url": f"http://127.0.0.1:{free_port()}/h"}).json()
    refused = _ping_and_get_delivery(client, closed["id"])

    # a filtered port (no answer at all) shows up as a connect timeout
    def silent(self: httpx.Client, *args: Any, **kwargs: Any) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out")

    monkeypatch.setattr(httpx.Client, "request", silent)
    dropped = client.post("/api/v1/webhooks", json={"url": f"http://127.0.0.1:{free_port()}/h"}).json()
    filtered = _ping_and_get_delivery(client, dropped["id"])

    assert refused["last_error"] == filtered["last_error"] == "connection failed"


# ---- MLflow tracking URIs ----------------------------------------------------------------------


def _job_body(dataset_id: int, uri: str) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "training": {"max_steps": 1},
        "tracking": {"mlflow": True, "mlflow_tracking_uri": uri},
    }


@pytest.fixture
def bobs_dataset(client: Any, other_user: Any) -> tuple[Any, int]:
    """Bob (a non-admin) and a dataset of his."""
    headers = {"Authorization": f"Bearer {other_user.token}"}
    uploaded = client.post("/api/v1/datasets", files={"file": ("d.csv", sst2_bytes(40))}, headers=headers)
    assert uploaded.status_code == 201, uploaded.text
    return other_user, int(uploaded.json()["id"])


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////tmp/steal.db",
        "file:///etc",
        "/var/lib/studio/mlruns",
        "postgresql://studio@127.0.0.1/studio",
        "http://127.0.0.1:5000",
        "http://169.254.169.254/",
        "https://mlflow.corp.test",  # resolves (below) to a private address
        "http://[::1",
    ],
)
def test_a_non_admin_cannot_aim_mlflow_at_local_stores_or_internal_servers(
    no_dispatcher: None,
    client: Any,
    bobs_dataset: tuple[Any, int],
    monkeypatch: pytest.MonkeyPatch,
    uri: str,
) -> None:
    fake_dns(monkeypatch, {"mlflow.corp.test": ["10.20.0.5"]})
    bob, dataset_id = bobs_dataset

    response = client.post(
        "/api/v1/jobs", json=_job_body(dataset_id, uri), headers={"Authorization": f"Bearer {bob.token}"}
    )

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "tracking.mlflow_tracking_uri"


def test_mlflow_uris_that_are_allowed(
    no_dispatcher: None, client: Any, bobs_dataset: tuple[Any, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"mlflow.example.test": ["93.184.216.34"], "mlflow.corp.test": ["10.20.0.5"]})
    allow_hosts(monkeypatch, "mlflow.corp.test")
    bob, dataset_id = bobs_dataset
    as_bob = {"Authorization": f"Bearer {bob.token}"}
    for uri in ("https://mlflow.example.test", "http://mlflow.corp.test:5000"):
        response = client.post("/api/v1/jobs", json=_job_body(dataset_id, uri), headers=as_bob)
        assert response.status_code == 201, (uri, response.text)
    # the admin may use a local store
    response = client.post("/api/v1/jobs", json=_job_body(dataset_id, "sqlite:////tmp/admin-mlflow.db"))
    assert response.status_code == 201, response.text
    # but not an internal server that is not allow-listed
    response = client.post("/api/v1/jobs", json=_job_body(dataset_id, "http://10.9.9.9:5000"))
    assert response.status_code == 422, response.text


def test_the_worker_checks_the_mlflow_uri_again(
    no_dispatcher: None, client: Any, other_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.tracking import _mlflow_uri_problem

    with _session() as session:
        dataset = create_dataset(session, sst2_bytes(20))
        bobs = create_job(session, dataset_id=dataset.id)
        bobs.owner_id = other_user.id
        session.add(bobs)
        unowned = create_job(session, dataset_id=dataset.id)  # a job with no owner: the admin's tooling
        session.commit()
        bob_id, unowned_id = bobs.id or 0, unowned.id or 0

    # a spec stored before the rule (or a job row written directly) is still refused by the worker
    assert _mlflow_uri_problem(bob_id, "sqlite:////tmp/x.db") is not None
    assert _mlflow_uri_problem(unowned_id, "sqlite:////tmp/x.db") is None
    # and a name that resolved to a public address at submit but points inside now
    fake_dns(monkeypatch, {"mlflow.example.test": ["10.0.0.7"]})
    assert "private" in str(_mlflow_uri_problem(bob_id, "https://mlflow.example.test"))
    assert _mlflow_uri_problem(bob_id, None) is None


# ---- a job no connected worker can run ---------------------------------------------------------


def _add_worker(name: str, queues: list[str], gpu_count: int = 0) -> None:
    with _session() as session:
        session.add(
            Worker(
                name=name,
                hostname="host",
                queues=queues,
                gpu_count=gpu_count,
                status="online",
                heartbeat_at=utcnow(),
            )
        )
        session.commit()


def test_a_job_no_connected_worker_can_run_says_why_it_waits(no_dispatcher: None, client: Any) -> None:
    dataset_id = client.post("/api/v1/datasets", files={"file": ("d.csv", sst2_bytes(40))}).json()["id"]
    _add_worker("cpu1@host", ["training", "training.cpu"])

    # when a GPU job is submitted while only a CPU worker is connected
    gpu_job = client.post(
        "/api/v1/jobs",
        json={"dataset_id": dataset_id, "training": {"max_steps": 1}, "resources": {"accelerator": "gpu"}},
    )
    cpu_job = client.post("/api/v1/jobs", json={"dataset_id": dataset_id, "training": {"max_steps": 1}})

    # then it is queued, but flagged, with an event and a line on its page
    assert gpu_job.status_code == 201, gpu_job.text
    job = gpu_job.json()
    assert job["status"] == "queued" and job["waiting_reason"] == "no worker with a GPU is connected"
    events = client.get(f"/api/v1/jobs/{job['id']}/events").json()
    assert any(e["kind"] == "waiting" and "no worker with a GPU" in e["message"] for e in events), events
    page = client.get(f"/jobs/{job['id']}", headers={"Accept": "text/html"})
    assert "no worker with a GPU is connected" in page.text
    # the CPU job is not
    assert cpu_job.json()["waiting_reason"] is None
    assert all(
        e["kind"] != "waiting" for e in client.get(f"/api/v1/jobs/{cpu_job.json()['id']}/events").json()
    )

    # when a GPU worker connects, the flag goes away
    _add_worker("gpu1@host", ["training", "training.gpu"], gpu_count=1)
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["waiting_reason"] is None


def test_a_silent_worker_does_not_count_and_classes_are_named(no_dispatcher: None, client: Any) -> None:
    from datetime import timedelta

    dataset_id = client.post("/api/v1/datasets", files={"file": ("d.csv", sst2_bytes(40))}).json()["id"]
    _add_worker("gpu-old@host", ["training", "training.gpu", "training.gpu.24gb"], gpu_count=1)
    with _session() as session:
        from sqlmodel import select

        row = session.exec(select(Worker)).one()
        row.heartbeat_at = utcnow() - timedelta(hours=1)  # stopped heartbeating an hour ago
        session.add(row)
        session.commit()

    response = client.post(
        "/api/v1/jobs",
        json={"dataset_id": dataset_id, "training": {"max_steps": 1}, "resources": {"gpu_class": "24gb"}},
    )

    assert response.status_code == 201, response.text
    assert response.json()["waiting_reason"] == (
        "no worker with a GPU (at least 24 GB of GPU memory) is connected"
    )
    assert JobStatus(response.json()["status"]) == JobStatus.queued
