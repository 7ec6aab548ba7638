"""Webhooks: signed job events to a loopback receiver, retries with backoff, the delivery log, the page.

The app runs in-process with its dispatcher thread switched off, and the tests call ``dispatch_once`` themselves,
so every attempt is deterministic. The dispatcher thread inside a real ``serve`` is covered by
tests/test_openai_compat.py.
"""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from app.core.models import Job, JobStatus, Webhook, utcnow
from app.services.webhooks import dispatch_once, sign, verify_signature
from tests.factories import create_dataset, create_job, sst2_bytes
from tests.webhook_receiver import Received, webhook_receiver

SECRET = "test-secret-0123456789"


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No dispatcher thread in the app (tests drive it) and retries a few milliseconds apart."""
    monkeypatch.setenv("PEFT_STUDIO_WEBHOOK_POLL_SECONDS", "0")
    monkeypatch.setenv("PEFT_STUDIO_WEBHOOK_RETRY_BASE_SECONDS", "0.05")
    monkeypatch.setenv("PEFT_STUDIO_WEBHOOK_MAX_ATTEMPTS", "4")
    # the loopback receiver (tests/webhook_receiver.py) is reachable only because the admin allow-lists it
    monkeypatch.setenv("PEFT_STUDIO_OUTBOUND_ALLOWED_HOSTS", "127.0.0.1")
    yield


def _session() -> Session:
    from app.core.db import get_engine

    return Session(get_engine())


def _finish_job(webhook_id: int, status: JobStatus) -> int:
    """A job of the webhook's owner that has just reached ``status``."""
    with _session() as session:
        webhook = session.get(Webhook, webhook_id)
        assert webhook is not None
        dataset = create_dataset(session, sst2_bytes(20, offset=len(session.exec(_count_jobs()).all()) * 20))
        job = create_job(session, dataset_id=dataset.id, training={"max_steps": 1})
        job.owner_id = webhook.owner_id
        job.status = status
        job.finished_at = utcnow()
        session.add(job)
        session.commit()
        assert job.id is not None
        return job.id


def _count_jobs() -> Any:
    from sqlmodel import select

    return select(Job.id)


def _dispatch_until(condition: Any, rounds: int = 100) -> None:
    for _ in range(rounds):
        dispatch_once()
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("the condition never held")


def _event(request: Received) -> dict[str, Any]:
    return dict(json.loads(request.body))


def test_signature_round_trip_and_tampering() -> None:
    body = b'{"type":"job.succeeded"}'
    timestamp = str(int(time.time()))
    signature = sign(SECRET, timestamp, body)

    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify_signature(SECRET, timestamp, body, signature)
    assert not verify_signature(SECRET, timestamp, body + b" ", signature)
    assert not verify_signature("another-secret-0123456", timestamp, body, signature)
    assert not verify_signature(
        SECRET, str(int(time.time()) - 3600), body, sign(SECRET, str(int(time.time()) - 3600), body)
    )


def test_create_list_and_delete_a_webhook(fast_retries: None, client: Any) -> None:
    created = client.post("/api/v1/webhooks", json={"url": "https://example.com/hook", "description": "ci"})
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["secret"].startswith("whsec_") and hook["events"] == [
        "job.succeeded",
        "job.failed",
        "job.cancelled",
    ]

    listed = client.get("/api/v1/webhooks").json()
    assert [item["id"] for item in listed["data"]] == [hook["id"]]
    assert "secret" not in listed["data"][0] and hook["secret"] not in json.dumps(listed)

    assert client.delete(f"/api/v1/webhooks/{hook['id']}").status_code == 204
    assert client.get(f"/api/v1/webhooks/{hook['id']}").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://example.com/hook", "secret": "short"}, "secret"),
        ({"url": "https://example.com/hook", "events": ["job.started"]}, "events"),
    ],
)
def test_bad_webhooks_are_refused_with_the_field(
    fast_retries: None, client: Any, body: dict[str, Any], field: str
) -> None:
    response = client.post("/api/v1/webhooks", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert client.get("/api/v1/webhooks").json()["count"] == 0


def test_a_finished_job_posts_one_signed_event(fast_retries: None, client: Any) -> None:
    with webhook_receiver() as receiver:
        # given a webhook and then a job of its owner that succeeds
        hook = client.post("/api/v1/webhooks", json={"url": receiver.url, "secret": SECRET}).json()
        job_id = _finish_job(hook["id"], JobStatus.succeeded)
        # when the dispatcher runs (twice: the second round must not send it again)
        _dispatch_until(lambda: len(receiver.requests) >= 1)
        dispatch_once()
        # then exactly one signed job.succeeded event arrived
        assert len(receiver.requests) == 1
        request = receiver.requests[0]
        headers = request.headers
        assert headers["x-peftstudio-event"] == "job.succeeded"
        assert verify_signature(
            SECRET, headers["x-peftstudio-timestamp"], request.body, headers["x-peftstudio-signature"]
        )
        event = _event(request)
        assert event["type"] == "job.succeeded" and event["id"] == headers["x-peftstudio-delivery"]
        assert event["data"]["job"]["id"] == job_id and event["data"]["job"]["status"] == "succeeded"
        assert event["data"]["fine_tuning_job_id"] == f"ftjob-{job_id}"

    log = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()
    assert log["count"] == 1
    delivery = log["data"][0]
    assert delivery["status"] == "delivered" and delivery["attempts"] == 1 and delivery["job_id"] == job_id
    assert delivery["attempt_log"][0]["status_code"] == 200


def test_a_failing_receiver_is_retried_with_backoff_and_the_log_shows_each_attempt(
    fast_retries: None, client: Any
) -> None:
    with webhook_receiver(fail_first=2) as receiver:
        hook = client.post("/api/v1/webhooks", json={"url": receiver.url, "secret": SECRET}).json()
        job_id = _finish_job(hook["id"], JobStatus.failed)

        def delivered() -> bool:
            data = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["data"]
            return bool(data) and data[0]["status"] == "delivered"

        _dispatch_until(delivered)

        assert len(receiver.requests) == 3
        # the same event (same id and body) each time, each attempt signed afresh
        assert len({request.body for request in receiver.requests}) == 1
        for request in receiver.requests:
            headers = request.headers
            assert verify_signature(
                SECRET, headers["x-peftstudio-timestamp"], request.body, headers["x-peftstudio-signature"]
            )
        assert _event(receiver.requests[0])["type"] == "job.failed"

    delivery = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["data"][0]
    assert delivery["job_id"] == job_id and delivery["attempts"] == 3
    assert [attempt["status_code"] for attempt in delivery["attempt_log"]] == [500, 500, 200]
    assert "HTTP 500" in delivery["attempt_log"][0]["error"]
    assert "boom" not in json.dumps(delivery)  # the receiver's answer is never shown, only its status
    # backoff: the second retry waited at least twice the base (0.05 s), the first at least the base
    times = [attempt["at"] for attempt in delivery["attempt_log"]]
    from datetime import datetime

    gaps = [
        (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
        for a, b in zip(times, times[1:], strict=False)
    ]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1


def test_delivery_gives_up_after_max_attempts_and_can_be_redelivered(fast_retries: None, client: Any) -> None:
    with webhook_receiver(fail_first=100) as receiver:
        hook = client.post("/api/v1/webhooks", json={"url": receiver.url}).json()
        _finish_job(hook["id"], JobStatus.succeeded)

        def failed() -> bool:
            data = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["data"]
            return bool(data) and data[0]["status"] == "failed"

        _dispatch_until(failed)
        assert len(receiver.requests) == 4  # PEFT_STUDIO_WEBHOOK_MAX_ATTEMPTS
        delivery = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["data"][0]
        assert delivery["attempts"] == 4 and delivery["next_attempt_at"] is None

        # the receiver is fixed: redeliver
        receiver.fail_first = 0
        again = client.post(f"/api/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/redeliver")
        assert again.status_code == 202, again.text
        _dispatch_until(lambda: len(receiver.requests) == 5)
    delivery = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["data"][0]
    assert delivery["status"] == "delivered" and delivery["attempts"] == 5


def test_cancelling_a_queued_job_sends_job_cancelled(fast_retries: None, client: Any) -> None:
    with webhook_receiver() as receiver:
        hook = client.post("/api/v1/webhooks", json={"url": receiver.url, "secret": SECRET}).json()
        with _session() as session:
            webhook = session.get(Webhook, hook["id"])
            dataset = create_dataset(session, sst2_bytes(20))
            job = create_job(session, dataset_id=dataset.id, training={"max_steps": 1})
            job.owner_id = webhook.owner_id if webhook else None
            session.add(job)
            session.commit()
            job_id = job.id

        assert client.post(f"/api/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        _dispatch_until(lambda: len(receiver.requests) >= 1)

        event = _event(receiver.requests[0])
        assert event["type"] == "job.cancelled" and event["data"]["job"]["id"] == job_id


def test_jobs_finished_before_the_webhook_existed_are_not_sent(fast_retries: None, client: Any) -> None:
    with webhook_receiver() as receiver:
        first = client.post("/api/v1/webhooks", json={"url": receiver.url}).json()
        _finish_job(first["id"], JobStatus.succeeded)
        time.sleep(0.01)
        later = client.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["job.failed"]}).json()
        _dispatch_until(lambda: len(receiver.requests) >= 1)
        dispatch_once()

    assert client.get(f"/api/v1/webhooks/{later['id']}/deliveries").json()["count"] == 0
    assert client.get(f"/api/v1/webhooks/{first['id']}/deliveries").json()["count"] == 1


def test_another_users_jobs_do_not_reach_my_webhook(fast_retries: None, client: Any, other_user: Any) -> None:
    bob = other_user
    with webhook_receiver() as receiver:
        mine = client.post(
            "/api/v1/webhooks", json={"url": receiver.url}, headers={"Authorization": f"Bearer {bob.token}"}
        ).json()
        admin_hook = client.post("/api/v1/webhooks", json={"url": "https://example.com/admin"}).json()
        _finish_job(admin_hook["id"], JobStatus.succeeded)  # the admin's job
        for _ in range(3):
            dispatch_once()
        assert receiver.requests == []
        # bob does not see the admin's webhook, the admin sees both
        bobs = client.get("/api/v1/webhooks", headers={"Authorization": f"Bearer {bob.token}"}).json()
        assert [item["id"] for item in bobs["data"]] == [mine["id"]]
        assert client.get("/api/v1/webhooks").json()["count"] == 2


def test_ping_and_the_page_show_the_delivery_log(fast_retries: None, client: Any, tmp_path: Path) -> None:
    with webhook_receiver() as receiver:
        hook = client.post("/api/v1/webhooks", json={"url": receiver.url, "secret": SECRET}).json()
        ping = client.post(f"/api/v1/webhooks/{hook['id']}/ping")
        assert ping.status_code == 202, ping.text
        _dispatch_until(lambda: len(receiver.requests) >= 1)
        assert receiver.requests[0].headers["x-peftstudio-event"] == "ping"

    page = client.get("/webhooks", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert receiver.url in page.text and "ping" in page.text and "delivered" in page.text
    assert SECRET not in page.text
