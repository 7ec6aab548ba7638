"""Cheap reads: job detail, job lists, metrics and series answer with an ETag and 304 when nothing changed
(app/http/etag.py), and a job list costs the same number of queries for 1 job as for 20 (no N+1)."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlmodel import Session

CSV = b"text,label\ngood movie,pos\nbad movie,neg\nlovely film,pos\nawful film,neg\ngreat,pos\npoor,neg\n"


def _job() -> int:
    from sqlmodel import select

    from app.core.db import get_engine
    from app.core.models import Dataset
    from tests.factories import create_dataset, create_job

    with Session(get_engine()) as session:
        dataset = session.exec(select(Dataset)).first() or create_dataset(session, CSV)
        job = create_job(session, dataset_id=dataset.id, training={"max_steps": 10})
        assert job.id is not None
        return job.id


def _add_points(job_id: int, steps: range) -> None:
    from app.core.db import get_engine
    from app.core.models import MetricPoint

    with Session(get_engine()) as session:
        for step in steps:
            session.add(MetricPoint(job_id=job_id, step=step, split="train", values={"loss": 1.0 / step}))
        session.commit()


@contextmanager
def _statements() -> Iterator[list[str]]:
    from app.core.db import get_engine

    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(get_engine(), "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(get_engine(), "before_cursor_execute", record)


def _revalidates(client: TestClient, path: str) -> str:
    """GET ``path``: 200 with an ETag; the same request with If-None-Match: 304, no body. Returns the tag."""
    first = client.get(path)
    assert first.status_code == 200, first.text
    tag = first.headers["etag"]
    assert first.headers["cache-control"] == "private, no-cache"
    again = client.get(path, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == tag
    return tag


def test_job_detail_and_list_answer_304_until_the_job_changes(client: TestClient) -> None:
    from app.core.db import get_engine
    from app.core.models import Job

    job_id = _job()
    detail = _revalidates(client, f"/api/v1/jobs/{job_id}")
    listing = _revalidates(client, "/api/v1/jobs")
    # when the job moves on, both answer 200 with a new tag
    with Session(get_engine()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.progress = 0.5
        session.add(job)
        session.commit()
    changed = client.get(f"/api/v1/jobs/{job_id}", headers={"If-None-Match": detail})
    assert changed.status_code == 200 and changed.json()["progress"] == 0.5
    assert changed.headers["etag"] != detail
    assert client.get("/api/v1/jobs", headers={"If-None-Match": listing}).status_code == 200
    # a stale tag among several still matches the current one (a browser may send a list)
    both = f'W/"stale", {changed.headers["etag"]}'
    assert client.get(f"/api/v1/jobs/{job_id}", headers={"If-None-Match": both}).status_code == 304


def test_metrics_answer_304_without_reading_the_points(client: TestClient) -> None:
    job_id = _job()
    _add_points(job_id, range(1, 51))
    tag = _revalidates(client, f"/api/v1/jobs/{job_id}/metrics")
    with _statements() as seen:
        assert client.get(f"/api/v1/jobs/{job_id}/metrics", headers={"If-None-Match": tag}).status_code == 304
    assert not [s for s in seen if 'metricpoint."values"' in s], "a 304 must not load the points"
    # a new point: 200, a new tag, the point in the body
    _add_points(job_id, range(51, 52))
    fresh = client.get(f"/api/v1/jobs/{job_id}/metrics", headers={"If-None-Match": tag})
    assert fresh.status_code == 200 and len(fresh.json()) == 51 and fresh.headers["etag"] != tag
    # `after` is part of the tag
    assert (
        client.get(f"/api/v1/jobs/{job_id}/metrics?after=1", headers={"If-None-Match": tag}).status_code
        == 200
    )


def test_series_answer_304_until_a_point_arrives(client: TestClient) -> None:
    job_id = _job()
    _add_points(job_id, range(1, 101))
    path = f"/api/v1/jobs/{job_id}/series?max_points=50"
    tag = _revalidates(client, path)
    assert (
        client.get(f"/api/v1/jobs/{job_id}/series?max_points=60", headers={"If-None-Match": tag}).status_code
        == 200
    )
    _add_points(job_id, range(101, 102))
    fresh = client.get(path, headers={"If-None-Match": tag})
    assert fresh.status_code == 200 and fresh.json()["points"] == 101


def test_a_job_list_costs_the_same_queries_for_one_job_as_for_twenty(client: TestClient) -> None:
    _job()
    client.get("/api/v1/jobs")  # first-request work (the token's last use, ...) is not the list's
    with _statements() as one:
        assert client.get("/api/v1/jobs").json()["count"] == 1
    for _ in range(19):
        _job()
    with _statements() as twenty:
        assert client.get("/api/v1/jobs").json()["count"] == 20
    assert len(twenty) == len(one), (len(one), len(twenty))


def test_a_job_list_shows_queue_positions_and_reasons_as_the_detail_does(client: TestClient) -> None:
    ids = [_job() for _ in range(3)]
    listed = {job["id"]: job for job in client.get("/api/v1/jobs").json()["data"]}
    for job_id in ids:
        detail = client.get(f"/api/v1/jobs/{job_id}").json()
        assert listed[job_id]["queue_position"] == detail["queue_position"]
        assert listed[job_id]["waiting_reason"] == detail["waiting_reason"]
    assert [listed[i]["queue_position"] for i in ids] == [1, 2, 3]


def test_the_web_process_freezes_its_start_up_objects_once(
    studio_settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a process that has frozen nothing yet
    import gc

    from app import main

    gc.unfreeze()
    monkeypatch.setattr(main, "_FROZEN", False)

    # when a web app starts, then the objects made so far are out of the collector's sight (a full collection in a
    # started web process walked them all: 112 ms, issue 20)
    with TestClient(main.create_app()):
        frozen = gc.get_freeze_count()
    assert frozen > 0
    gc.unfreeze()  # give this test process's objects back to the collector
