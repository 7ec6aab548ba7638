"""The artifact store on an S3-compatible bucket (moto's server mode, run locally): the store's methods, and a
job whose dataset and adapter live only in the bucket, served back by the web download."""

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from app.core.db import get_engine
from app.core.models import Adapter, Job, JobStatus
from tests.factories import create_job, sst2_bytes

BUCKET = "studio-artifacts"
PREFIX = "team-a"
CREDENTIALS = {"aws_access_key_id": "studio", "aws_secret_access_key": "studio-secret"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 API on a free local port (moto in server mode), with one bucket."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS).create_bucket(
        Bucket=BUCKET
    )
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **CREDENTIALS)


@pytest.fixture
def bucket_settings(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Studio settings that put artifacts in the bucket under a prefix of this test's own."""
    prefix = f"{PREFIX}/{tmp_path.name}"
    monkeypatch.setenv("PEFT_STUDIO_ARTIFACT_URL", f"s3://{BUCKET}/{prefix}")
    monkeypatch.setenv("PEFT_STUDIO_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("PEFT_STUDIO_S3_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("PEFT_STUDIO_S3_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("PEFT_STUDIO_S3_REGION", "us-east-1")
    monkeypatch.setenv("PEFT_STUDIO_TORCH_THREADS", "1")
    from app.core.settings import get_settings

    get_settings.cache_clear()
    return prefix


def _objects(s3_client: Any, prefix: str) -> dict[str, bytes]:
    listing = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
    return {
        item["Key"][len(prefix) + 1 :]: s3_client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        for item in listing
    }


def test_store_methods_work_on_a_bucket(bucket_settings: str, studio_settings: Path, s3_client: Any) -> None:
    from app.core.storage import get_store

    # given the configured store and a local folder
    store = get_store()
    assert not store.is_local
    folder = studio_settings / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text('{"a": 1}')
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x01")

    # when a folder and a file are stored
    store.put_dir(folder, "jobs/1/adapter")
    store.put_file(folder / "a.json", "datasets/x.json")

    # then they are in the bucket under the prefix, and come back as local copies
    assert set(_objects(s3_client, bucket_settings)) == {
        "jobs/1/adapter/a.json",
        "jobs/1/adapter/sub/b.bin",
        "datasets/x.json",
    }
    assert store.exists("jobs/1/adapter") and not store.exists("jobs/2")
    assert store.list("jobs/1") == ["jobs/1/adapter/a.json", "jobs/1/adapter/sub/b.bin"]
    assert store.local_file("datasets/x.json").read_text() == '{"a": 1}'
    copy = store.local_dir("jobs/1/adapter")
    assert (copy / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    with store.open("jobs/1/adapter/a.json") as stream:
        assert stream.read() == b'{"a": 1}'
    # a replaced folder refreshes the cached copy
    (folder / "a.json").write_text('{"a": 2}')
    store.put_dir(folder, "jobs/1/adapter")
    assert (store.local_dir("jobs/1/adapter") / "a.json").read_text() == '{"a": 2}'
    # keys stay inside the prefix, and there is no local path for a bucket
    with pytest.raises(ValueError):
        store.put_file(folder / "a.json", "../escape.json")
    with pytest.raises(RuntimeError):
        store.path("datasets/x.json")
    store.delete("jobs/1")
    assert store.list("jobs") == [] and not store.exists("jobs/1/adapter")


def test_job_reads_its_dataset_from_the_bucket_and_the_web_serves_its_adapter(
    bucket_settings: str, client: Any, studio_settings: Path, s3_client: Any
) -> None:
    from app.core.settings import get_settings

    get_settings.cache_clear()
    # given a dataset uploaded through the API: it lands in the bucket, not on local disk
    response = client.post(
        "/api/v1/datasets", files={"file": ("reviews.csv", io.BytesIO(sst2_bytes(32)), "text/csv")}
    )
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    stored = _objects(s3_client, bucket_settings)
    assert [key for key in stored if key.startswith("datasets/")], stored
    assert not (studio_settings / "artifacts" / "datasets").exists()

    # when a worker with an empty cache (another host) trains a job on it
    cache = get_settings().resolved_artifact_cache_dir
    for path in sorted(cache.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    with Session(get_engine()) as session:
        job = create_job(
            session,
            dataset_id=dataset_id,
            validation_fraction=0,
            training={"max_steps": 2, "batch_size": 8, "max_length": 32, "logging_steps": 1},
        )
    from worker.engine import run_job

    run_job(job.id, worker_name="remote-worker")

    # then the job succeeded and its adapter is in the bucket
    with Session(get_engine()) as session:
        finished = session.get(Job, job.id)
        assert finished.status == JobStatus.succeeded, finished.error
        adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()
    in_bucket = {
        key.removeprefix(adapter.storage_key + "/"): data
        for key, data in _objects(s3_client, bucket_settings).items()
        if key.startswith(adapter.storage_key + "/")
    }
    assert "adapter_model.safetensors" in in_bucket and "studio.json" in in_bucket

    # and the web download serves exactly the bucket's files
    download = client.get(f"/api/v1/adapters/{adapter.id}/download")
    assert download.status_code == 200, download.text
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        served = {name: archive.read(name) for name in archive.namelist()}
    assert served == in_bucket
