"""/api/v1/datasets: upload, list, detail and delete against the real app (SQLite, no worker)."""

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from app.core.db import get_engine
from app.core.models import Dataset, Job, JobStatus

CSV = b"text,label\ngood movie,pos\nbad movie,neg\nlovely film,pos\nawful film,neg\n"


def _upload(client: TestClient, data: bytes = CSV, filename: str = "reviews.csv", **form: str) -> Any:
    return client.post("/api/v1/datasets", files={"file": (filename, data)}, data=form or None)


def _insert_job(dataset_id: int, status: JobStatus, **spec: Any) -> int:
    """A job row straight into the database: never sent to any queue."""
    with Session(get_engine()) as session:
        job = Job(
            name="uses the dataset",
            status=status,
            spec={"dataset_id": dataset_id, **spec},
            method="lora",
            base_model="bundled/all-MiniLM-L6-v2",
            dataset_id=dataset_id,
        )
        session.add(job)
        session.commit()
        assert job.id is not None
        return job.id


def _stored_file(data_dir: Path, dataset_id: int) -> Path:
    from app.core.storage import get_store

    with Session(get_engine()) as session:
        dataset = session.get(Dataset, dataset_id)
        assert dataset is not None
        return get_store().path(dataset.storage_key)


def test_upload_returns_the_profile(client: TestClient, studio_settings: Path) -> None:
    response = _upload(client, name="Movie reviews")

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "Movie reviews"
    assert body["filename"] == "reviews.csv"
    assert body["format"] == "csv"
    assert body["row_count"] == 4
    assert body["columns"] == ["text", "label"]
    assert body["size_bytes"] == len(CSV)
    assert body["profile"]["columns"]["label"]["value_counts"] == {"pos": 2, "neg": 2}
    assert body["profile"]["preview"][0] == {"text": "good movie", "label": "pos"}
    stored = _stored_file(studio_settings, body["id"])
    assert stored.read_bytes() == CSV
    assert stored.name != "reviews.csv"  # generated names only
    assert not any((studio_settings / "artifacts" / "tmp").iterdir())


def test_windows_path_in_file_name_keeps_only_the_name(client: TestClient) -> None:
    # python-multipart reduces an IE-style "C:\dir\name" to "name" before the app sees it; no path is stored.
    response = _upload(client, filename="C:\\x\\y.csv")

    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "y.csv"


def test_blank_name_falls_back_to_the_file_name(client: TestClient) -> None:
    response = _upload(client, name="   ")

    assert response.json()["name"] == "reviews.csv"


def test_list_and_detail(client: TestClient) -> None:
    first = _upload(client).json()
    second = _upload(client, b'{"text": "x", "label": 1}\n{"text": "y", "label": 2}\n', "more.jsonl").json()

    listing = client.get("/api/v1/datasets").json()
    assert listing["count"] == 2
    assert [item["id"] for item in listing["data"]] == [second["id"], first["id"]]  # newest first
    detail = client.get(f"/api/v1/datasets/{first['id']}")
    assert detail.status_code == 200
    assert detail.json() == first


def test_delete_removes_the_row_and_the_file(client: TestClient, studio_settings: Path) -> None:
    dataset_id = _upload(client).json()["id"]
    stored = _stored_file(studio_settings, dataset_id)

    response = client.delete(f"/api/v1/datasets/{dataset_id}")

    assert response.status_code == 204
    assert not stored.exists()
    assert client.get("/api/v1/datasets").json()["count"] == 0
    missing = client.get(f"/api/v1/datasets/{dataset_id}")
    assert missing.status_code == 404
    assert missing.json()["detail"] == f"Dataset {dataset_id} does not exist."
    assert client.delete(f"/api/v1/datasets/{dataset_id}").status_code == 404


def test_unknown_dataset_is_404_with_a_message(client: TestClient) -> None:
    response = client.get("/api/v1/datasets/4242")

    assert response.status_code == 404
    assert response.json() == {"detail": "Dataset 4242 does not exist."}


def test_same_file_again_after_delete_is_accepted(client: TestClient) -> None:
    dataset_id = _upload(client).json()["id"]
    assert _upload(client).status_code == 409
    client.delete(f"/api/v1/datasets/{dataset_id}")

    assert _upload(client).status_code == 201


@pytest.mark.parametrize("status", [JobStatus.queued, JobStatus.running])
def test_delete_refused_while_a_job_needs_the_dataset(
    client: TestClient, studio_settings: Path, status: JobStatus
) -> None:
    dataset_id = _upload(client).json()["id"]
    job_id = _insert_job(dataset_id, status)

    response = client.delete(f"/api/v1/datasets/{dataset_id}")

    assert response.status_code == 409
    assert f"Dataset {dataset_id} is used by job {job_id}, which is {status}" in response.json()["detail"]
    assert client.get(f"/api/v1/datasets/{dataset_id}").status_code == 200
    assert _stored_file(studio_settings, dataset_id).exists()


def test_delete_refused_while_a_queued_job_evaluates_on_it(client: TestClient) -> None:
    train_id = _upload(client).json()["id"]
    validation_id = _upload(client, CSV + b"fine film,pos\n", "validation.csv").json()["id"]
    job_id = _insert_job(train_id, JobStatus.queued, validation_dataset_id=validation_id)

    response = client.delete(f"/api/v1/datasets/{validation_id}")

    assert response.status_code == 409
    assert f"used by job {job_id}" in response.json()["detail"]


def test_delete_allowed_once_the_job_is_finished(client: TestClient) -> None:
    dataset_id = _upload(client).json()["id"]
    job_id = _insert_job(dataset_id, JobStatus.succeeded)

    assert client.delete(f"/api/v1/datasets/{dataset_id}").status_code == 204
    with Session(get_engine()) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.dataset_id is None
