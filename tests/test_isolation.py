"""Isolation between users: the cross-user matrix, built by walking the app's routes.

Alice owns a dataset, a job, an adapter, a sweep, a webhook and a token. For every route that takes an id,
Bob with Alice's id gets 404 — exactly as for an id that does not exist — and her objects are still there
afterwards; every list and page without an id answers Bob without a trace of Alice's objects; the admin sees
them. A new route with an id parameter this file does not know fails the test until it is added to
``owned_value`` (or, for ids that are not owned objects, to ``NOT_OWNED``).
"""

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlmodel import Session

from app.core.db import get_engine
from app.core.models import (
    Adapter,
    Evaluation,
    Job,
    JobStatus,
    ModelDownload,
    Sweep,
    Webhook,
    WebhookDelivery,
)
from app.core.spec import JobSpec
from app.core.storage import get_store
from tests.conftest import Account
from tests.factories import sst2_bytes

SECRET = "alice-secret"
# Routes whose ids are not owned objects: the admin-only account routes answer 403 to everyone else.
ADMIN_ONLY = re.compile(r"^/(api/v1/)?users/")
# Known bodies for routes that validate one before the handler runs (else FastAPI answers 422 first).
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/adapters/{adapter_id}/predict"): {"json": {"text": "a fine film"}},
    ("POST", "/adapters/{adapter_id}/predict"): {"data": {"text": "a fine film"}},
    ("POST", "/api/v1/adapters/{adapter_id}/generate"): {"json": {"prompt": "hello"}},
    ("GET", "/api/v1/adapters/{adapter_id}/generate/stream"): {"params": {"prompt": "hello"}},
    ("PATCH", "/api/v1/users/{user_id}"): {"json": {"max_concurrent_jobs": 9}},
    ("POST", "/api/v1/adapters/{adapter_id}/evaluations"): {"json": {"dataset_id": 1}},
}
# Studio-wide objects: the model library and its Hub downloads are shared by everyone on the server (one
# Hub cache the workers share), so Bob may read them; only changing them is kept to their owner or an admin.
SHARED: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/api/v1/models/{model_id:path}"): (200,),
    ("DELETE", "/api/v1/models/{model_id:path}"): (403,),
    ("GET", "/api/v1/model-downloads/{download_id}"): (200,),
    ("GET", "/api/v1/model-downloads/{download_id}/stream"): (200,),
    ("POST", "/api/v1/model-downloads/{download_id}/cancel"): (403,),
    ("POST", "/models/downloads/{download_id}/cancel"): (403,),
}
# Streams and downloads would hold a request open or send files; with another owner's id they end at once.
SKIP_LIST_CHECK = re.compile(r"/stream$|/download$|/content$|^/logout$|^/login|^/register$|^/healthz$")


@dataclass
class AliceObjects:
    user: Account
    dataset: int
    job: int
    adapter: int
    sweep: int
    webhook: int
    delivery: int
    token: int
    evaluation: int = 0
    download: int = 0


@pytest.fixture
def alice(client: TestClient, make_user: Any) -> AliceObjects:
    """Alice and one of each kind of object she owns (names contain SECRET)."""
    account = make_user("alice")
    files = {"file": ("alice.csv", sst2_bytes(40), "text/csv")}
    dataset = client.post(
        "/api/v1/datasets", files=files, data={"name": f"{SECRET}-dataset"}, headers=account.headers
    ).json()
    token = client.post("/api/v1/tokens", json={"name": f"{SECRET}-token"}, headers=account.headers).json()
    spec = JobSpec.model_validate({"dataset_id": dataset["id"], "name": f"{SECRET}-job"}).model_dump(
        mode="json"
    )
    with Session(get_engine()) as session:
        job = Job(
            name=f"{SECRET}-job",
            spec=spec,
            method="lora",
            base_model=spec["base_model"],
            dataset_id=dataset["id"],
            status=JobStatus.succeeded,
            owner_id=account.id,
        )
        session.add(job)
        session.commit()
        assert job.id is not None
        key = get_store().job_key(job.id, "adapter")
        folder = get_store().path(key)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        adapter = Adapter(
            job_id=job.id,
            owner_id=account.id,
            name=f"{SECRET}-adapter",
            method="lora",
            task="sequence-classification",
            base_model=spec["base_model"],
            storage_key=key,
            size_bytes=2,
            files=["adapter_config.json"],
            trainable_params=1,
            total_params=10,
            labels=["0", "1"],
        )
        sweep = Sweep(name=f"{SECRET}-sweep", base_spec=spec, grid={}, owner_id=account.id)
        webhook = Webhook(url="http://127.0.0.1:9/alice", secret="s" * 32, description=f"{SECRET}-webhook",
                          events=["job.succeeded"], owner_id=account.id)  # fmt: skip
        session.add_all([adapter, sweep, webhook])
        session.commit()
        assert webhook.id is not None
        delivery = WebhookDelivery(webhook_id=webhook.id, owner_id=account.id, job_id=job.id, event_id="e1",
                                   event_type="job.succeeded", payload={"name": SECRET})  # fmt: skip
        session.add(delivery)
        evaluation = Evaluation(owner_id=account.id, adapter_id=adapter.id or 0, dataset_id=dataset["id"],
                                task="sequence-classification", settings={"text_column": SECRET})  # fmt: skip
        session.add(evaluation)
        download = ModelDownload(owner_id=account.id, model_id="alice/model", status="succeeded")
        session.add(download)
        session.commit()
        return AliceObjects(
            account,
            dataset["id"],
            job.id,
            adapter.id or 0,
            sweep.id or 0,
            webhook.id or 0,
            delivery.id or 0,
            token["id"],
            evaluation.id or 0,
            download.id or 0,
        )


def owned_value(path: str, param: str, alice: AliceObjects) -> str | None:
    """Alice's value for a path parameter (None: a parameter this matrix does not know)."""
    openai = path.startswith("/v1/")
    values = {
        "dataset_id": str(alice.dataset),
        "job_id": f"ftjob-{alice.job}" if openai else str(alice.job),
        "adapter_id": str(alice.adapter),
        "sweep_id": str(alice.sweep),
        "webhook_id": str(alice.webhook),
        "delivery_id": str(alice.delivery),
        "token_id": str(alice.token),
        "evaluation_id": str(alice.evaluation),
        "download_id": str(alice.download),
        "model_id": "bundled/all-MiniLM-L6-v2",
        "user_id": str(alice.user.id),
        "step": "1",
        "file_id": f"file-{alice.dataset}",
        "model": f"ft:all-MiniLM-L6-v2:ftjob-{alice.job}",
    }
    return values.get(param)


def _routes(client: TestClient) -> list[tuple[str, str]]:
    found = []
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        if isinstance(route.route, APIRoute):
            found.extend((method, route.path) for method in sorted(set(route.methods or ()) - {"HEAD"}))
    return found


def test_other_users_ids_are_404_on_every_route(
    client: TestClient, alice: AliceObjects, other_user: Account
) -> None:
    checked: list[str] = []
    unknown: list[str] = []
    for method, path in _routes(client):
        params = re.findall(r"\{([^}:]+)(?::[^}]*)?\}", path)
        if not params:
            continue
        url = path
        for param in params:
            value = owned_value(path, param, alice)
            if value is None:
                unknown.append(f"{method} {path} ({param})")
                break
            url = re.sub(r"\{" + param + r"(:[^}]*)?\}", value, url)
        else:
            if (method, path) in SHARED:
                # when: Bob reads or changes a studio-wide object: reading works, changing is refused
                response = client.request(method, url, headers=other_user.headers, follow_redirects=False)
                assert response.status_code in SHARED[(method, path)], (
                    f"{method} {url}: {response.status_code} {response.text[:300]}"
                )
                checked.append(f"{method} {path}")
                continue
            # when: Bob uses Alice's id
            response = client.request(method, url, headers=other_user.headers, follow_redirects=False,
                                      **BODIES.get((method, path), {}))  # fmt: skip
            # then: 404 exactly as for a missing id (403 on admin-only account routes), and nothing leaks
            expected = (403, 404) if ADMIN_ONLY.match(path) else (404,)
            assert response.status_code in expected, (
                f"{method} {url}: {response.status_code} {response.text[:300]}"
            )
            assert SECRET not in response.text, f"{method} {url} leaks Alice's object"
            checked.append(f"{method} {path}")
    assert not unknown, f"routes with ids this matrix does not know; add them to owned_value: {unknown}"
    assert len(checked) > 25

    # and: Alice's objects are all still there, and she (and the admin) can see them
    for path in (
        f"/api/v1/datasets/{alice.dataset}",
        f"/api/v1/jobs/{alice.job}",
        f"/api/v1/adapters/{alice.adapter}",
    ):
        assert client.get(path, headers=alice.user.headers).status_code == 200, path
        assert client.get(path).status_code == 200, path
    tokens = client.get("/api/v1/tokens", headers=alice.user.headers).json()["data"]
    assert [t["revoked_at"] for t in tokens if t["id"] == alice.token] == [None]


def test_lists_and_pages_never_show_other_users_objects(
    client: TestClient, alice: AliceObjects, other_user: Account
) -> None:
    checked = 0
    for method, path in _routes(client):
        if method != "GET" or "{" in path or SKIP_LIST_CHECK.search(path):
            continue
        response = client.get(path, headers=other_user.headers, follow_redirects=False)
        assert response.status_code < 500, f"GET {path}: {response.status_code}"
        assert SECRET not in response.text, f"GET {path} shows Alice's objects to Bob"
        checked += 1
    assert checked > 10
    # the admin sees everyone's
    assert f"{SECRET}-dataset" in json.dumps(client.get("/api/v1/datasets").json())
    assert f"{SECRET}-job" in client.get("/jobs").text


def test_bodies_that_name_other_users_objects_are_refused(
    client: TestClient, alice: AliceObjects, other_user: Account
) -> None:
    spec = {"dataset_id": alice.dataset}
    attempts = [
        ("POST", "/api/v1/jobs", {"json": spec}),
        ("POST", "/api/v1/jobs/estimate", {"json": spec}),
        ("POST", "/api/v1/jobs/preview", {"json": {**spec, "task": "causal-lm"}}),
        (
            "POST",
            "/api/v1/jobs",
            {"json": {"dataset_id": alice.dataset + 1000, "validation_dataset_id": alice.dataset}},
        ),
        ("POST", "/jobs/new", {"data": {"dataset_id": str(alice.dataset)}}),
        ("GET", "/api/v1/compare", {"params": {"jobs": str(alice.job)}}),
        (
            "POST",
            "/v1/chat/completions",
            {"json": {"model": f"ft:x:ftjob-{alice.job}", "messages": [{"role": "user", "content": "hi"}]}},
        ),
        (
            "POST",
            "/v1/fine_tuning/jobs",
            {"json": {"model": "bundled/all-MiniLM-L6-v2", "training_file": f"file-{alice.dataset}"}},
        ),
    ]
    for method, path, kwargs in attempts:
        response = client.request(method, path, headers=other_user.headers, follow_redirects=False, **kwargs)
        assert response.status_code in (404, 422), (
            f"{method} {path}: {response.status_code} {response.text[:300]}"
        )
        assert SECRET not in response.text
    assert client.get("/api/v1/jobs", headers=other_user.headers).json()["count"] == 0


def test_same_file_may_be_uploaded_by_two_users(client: TestClient, other_user: Account) -> None:
    files = {"file": ("same.csv", sst2_bytes(30), "text/csv")}
    assert client.post("/api/v1/datasets", files=files).status_code == 201
    assert client.post("/api/v1/datasets", files=files, headers=other_user.headers).status_code == 201
    assert client.post("/api/v1/datasets", files=files, headers=other_user.headers).status_code == 409
    demo = [client.post("/api/v1/datasets/demo", headers=h).json()["id"] for h in ({}, other_user.headers)]
    assert demo[0] != demo[1]


def test_the_admin_may_use_anyones_dataset(client: TestClient, other_user: Account) -> None:
    files = {"file": ("bob.csv", sst2_bytes(40), "text/csv")}
    dataset = client.post("/api/v1/datasets", files=files, headers=other_user.headers).json()
    spec = {"dataset_id": dataset["id"], "training": {"max_steps": 1}}
    assert client.post("/api/v1/jobs/estimate", json=spec).status_code == 200
    created = client.post("/api/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    # the job is the admin's: Bob does not see it
    assert client.get(f"/api/v1/jobs/{created.json()['id']}", headers=other_user.headers).status_code == 404
