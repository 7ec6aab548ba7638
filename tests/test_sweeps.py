"""Sweeps: a base spec and lists of values become a grid of queued jobs (no worker here: jobs stay queued)."""

from typing import Any

import pytest

from tests.factories import sst2_bytes


@pytest.fixture(autouse=True)
def queued(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Job ids sent to the queue (no broker or worker needed: these tests stop at queueing)."""
    sent: list[int] = []

    def enqueue(job_id: int, *args: Any, **kwargs: Any) -> str:
        sent.append(job_id)
        return f"task-{job_id}"

    monkeypatch.setattr("app.core.queue.enqueue_training", enqueue)
    return sent


@pytest.fixture
def dataset_id(client: Any) -> int:
    response = client.post("/api/v1/datasets", files={"file": ("sst2.csv", sst2_bytes(64))})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _base(dataset_id: int) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "training": {"max_steps": 3, "batch_size": 8, "max_length": 32}}


def test_a_2x2_sweep_queues_4_jobs_with_the_right_specs(
    client: Any, dataset_id: int, queued: list[int]
) -> None:
    # given
    request = {
        "name": "lr × method",
        "base": _base(dataset_id),
        "grid": {"method": ["lora", "ia3"], "training.learning_rate": [0.001, 0.002]},
    }

    # when
    response = client.post("/api/v1/sweeps", json=request)

    # then
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert len(sweep["jobs"]) == 4 and len(sweep["job_ids"]) == 4
    assert sorted(queued) == sorted(sweep["job_ids"])
    combos = {(job["spec"]["method"], job["spec"]["training"]["learning_rate"]) for job in sweep["jobs"]}
    assert combos == {("lora", 0.001), ("lora", 0.002), ("ia3", 0.001), ("ia3", 0.002)}
    for job in sweep["jobs"]:
        assert job["status"] == "queued"
        assert job["sweep_id"] == sweep["id"]
        assert job["method"] == job["spec"]["method"]
        assert job["spec"]["dataset_id"] == dataset_id
        assert job["spec"]["training"]["max_steps"] == 3  # the base spec is kept
        assert job["spec"]["training"]["batch_size"] == 8
        assert job["name"].startswith("lr × method · method=")
    assert client.get(f"/api/v1/sweeps/{sweep['id']}").json()["job_ids"] == sweep["job_ids"]
    listed = client.get("/api/v1/sweeps").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == sweep["id"]

    # then: the sweep page compares exactly these jobs; the diff lists only what the grid changed
    page = client.get(f"/sweeps/{sweep['id']}", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert f'data-job-ids="{",".join(map(str, sweep["job_ids"]))}"' in page.text
    compared = client.get("/api/v1/compare", params={"jobs": ",".join(map(str, sweep["job_ids"]))}).json()
    fields = {row["field"] for row in compared["diff"]}
    assert "training.learning_rate" in fields and "method" in fields
    assert not any(f.startswith(("training.max_steps", "training.batch_size", "dataset_id")) for f in fields)


def test_method_settings_apply_only_to_methods_that_have_them(client: Any, dataset_id: int) -> None:
    request = {"base": _base(dataset_id), "grid": {"method": ["lora", "ia3"], "method_config.r": [4, 8]}}
    sweep = client.post("/api/v1/sweeps", json=request).json()
    specs = sorted((job["spec"]["method"], job["spec"]["method_config"].get("r")) for job in sweep["jobs"])
    assert specs == [("ia3", None), ("lora", 4), ("lora", 8)]  # IA3 has no rank: queued once


@pytest.mark.parametrize(
    ("grid", "field", "words"),
    [
        ({"training.learning_rat": [0.1]}, "grid.training.learning_rat", "not a field of training"),
        ({"method_config.rank": [4]}, "grid.method_config.rank", "not a setting of any method"),
        ({"colour": ["red"]}, "grid.colour", "not a spec field"),
        ({"method": []}, "grid.method", "no values"),
        ({}, "grid", "at least one field"),
        (
            {"training.learning_rate": [1e-3] * 9, "training.batch_size": [1, 2, 3, 4, 5, 6, 7, 8]},
            "grid",
            "at most 64",
        ),
        ({"training.learning_rate": [0.001, -1]}, "training.learning_rate", "learning_rate=-1"),
        ({"method": ["lora", "sorcery"]}, "method", "unknown method"),
    ],
)
def test_bad_grids_are_refused_and_queue_nothing(
    client: Any, dataset_id: int, grid: dict[str, Any], field: str, words: str
) -> None:
    response = client.post("/api/v1/sweeps", json={"base": _base(dataset_id), "grid": grid})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body.get("field") == field, body
    assert words in body["detail"]
    assert client.get("/api/v1/sweeps").json()["count"] == 0
    assert client.get("/api/v1/jobs").json()["count"] == 0


def test_a_missing_dataset_names_the_combination(client: Any) -> None:
    request = {"base": {"dataset_id": 999}, "grid": {"method": ["lora"]}}
    response = client.post("/api/v1/sweeps", json=request)
    assert response.status_code == 422
    assert "method=lora" in response.json()["detail"] and "dataset 999" in response.json()["detail"]


def test_the_sweep_form_queues_the_grid(client: Any, dataset_id: int) -> None:
    # given: the form as a browser posts it
    form = {
        "name": "from the form",
        "dataset_id": str(dataset_id),
        "task": "sequence-classification",
        "text_column": "text",
        "label_column": "label",
        "methods": ["lora", "loraplus"],
        "learning_rates": "1e-3, 2e-3",
        "ranks": "4",
        "max_steps": "3",
        "max_length": "32",
        "logging_steps": "1",
        "extra": '{"training": {"batch_size": 4}}',
    }
    assert client.get("/sweeps/new", headers={"Accept": "text/html"}).status_code == 200

    # when
    response = client.post("/sweeps/new", data=form, follow_redirects=False)

    # then
    assert response.status_code == 303, response.text
    sweep_id = int(response.headers["location"].rsplit("/", 1)[1])
    jobs = client.get(f"/api/v1/sweeps/{sweep_id}").json()["jobs"]
    assert len(jobs) == 4
    assert {job["spec"]["method_config"]["r"] for job in jobs} == {4}
    assert {job["spec"]["training"]["batch_size"] for job in jobs} == {4}
    assert {job["spec"]["training"]["logging_steps"] for job in jobs} == {1}
    assert (
        client.get("/sweeps", headers={"Accept": "text/html"}).text.count(f'href="/sweeps/{sweep_id}"') == 1
    )

    # when: a bad value comes back in the form with a 422
    bad = client.post("/sweeps/new", data={**form, "learning_rates": "fast"})
    assert bad.status_code == 422
    assert "learning_rates" in bad.text and "fast" in bad.text


def test_a_queue_failure_part_way_cancels_what_was_queued(
    client: Any, dataset_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def flaky(job_id: int, *args: Any, **kwargs: Any) -> str:
        calls.append(job_id)
        if len(calls) == 2:
            raise ConnectionError("broker down")
        return "task"

    monkeypatch.setattr("app.core.queue.enqueue_training", flaky)
    request = {"base": _base(dataset_id), "grid": {"training.learning_rate": [0.001, 0.002, 0.003]}}
    response = client.post("/api/v1/sweeps", json=request)
    assert response.status_code == 503
    assert "broker down" in response.json()["detail"]
    jobs = client.get("/api/v1/jobs").json()["data"]
    assert [job["status"] for job in jobs] == [
        "cancelled"
    ]  # the one queued before the failure; no job is left queued
