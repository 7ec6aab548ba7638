"""Job actions and queue state (issue 19): retry only for failed or cancelled jobs, clone for every job, a queued
job's position in its queue, in the API, on the job page and in the CLI's progress line."""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from app.core.db import get_engine
from app.core.models import JobStatus
from app.web.pages import clone_values
from app.web.render import ordinal
from tests.factories import create_dataset, create_job, sst2_bytes

HTML = {"accept": "text/html"}


def _jobs(statuses: list[JobStatus], rows: int = 40, **spec: Any) -> list[int]:
    with Session(get_engine()) as session:
        dataset = create_dataset(session, sst2_bytes(rows))
        ids = []
        for index, status in enumerate(statuses):
            job = create_job(session, dataset_id=dataset.id, name=f"job {index}", **spec)
            job.status = status
            session.add(job)
            session.commit()
            ids.append(int(job.id or 0))
        return ids


def test_retry_is_refused_for_a_succeeded_or_unfinished_job_and_allowed_for_a_failed_one(
    client: TestClient,
) -> None:
    succeeded, running, failed = _jobs([JobStatus.succeeded, JobStatus.running, JobStatus.failed])

    # a succeeded job: 409 naming the clone form, and no new job
    refused = client.post(f"/api/v1/jobs/{succeeded}/retry")
    assert refused.status_code == 409, refused.text
    assert "only failed or cancelled" in refused.json()["detail"]
    assert f"/jobs/new?clone={succeeded}" in refused.json()["detail"]
    refused = client.post(f"/api/v1/jobs/{running}/retry")
    assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]
    assert client.get("/api/v1/jobs").json()["count"] == 3

    # a failed job: a new queued job with the same spec
    retried = client.post(f"/api/v1/jobs/{failed}/retry")
    assert retried.status_code == 201, retried.text
    assert retried.json()["status"] == "queued" and retried.json()["name"] == "job 2 (retry)"


def test_job_page_offers_retry_only_for_failed_jobs_and_clone_for_every_job(client: TestClient) -> None:
    succeeded, failed = _jobs([JobStatus.succeeded, JobStatus.failed])

    page = client.get(f"/jobs/{succeeded}", headers=HTML).text
    assert 'data-testid="retry-job"' not in page
    assert f'href="/jobs/new?clone={succeeded}"' in page

    page = client.get(f"/jobs/{failed}", headers=HTML).text
    assert 'data-testid="retry-job"' in page and f'href="/jobs/new?clone={failed}"' in page


def test_queue_position_counts_earlier_queued_jobs_of_the_same_queue(client: TestClient) -> None:
    done, first, second, third = _jobs([JobStatus.succeeded, *[JobStatus.queued] * 3])
    (cpu_only,) = _jobs([JobStatus.queued], rows=41, resources={"accelerator": "cpu"})

    positions = {job["id"]: job["queue_position"] for job in client.get("/api/v1/jobs").json()["data"]}

    assert positions == {done: None, first: 1, second: 2, third: 3, cpu_only: 1}
    # the job page says it in words, with the existing waiting reason (no worker runs in this test)
    page = client.get(f"/jobs/{second}", headers=HTML).text
    assert 'data-testid="job-queue-position"' in page and "2nd in the queue" in page
    assert "no worker is connected" in page
    # when the first one starts, the others move up
    with Session(get_engine()) as session:
        from app.core.models import Job

        job = session.get(Job, first)
        assert job is not None
        job.status = JobStatus.running
        session.add(job)
        session.commit()
    assert client.get(f"/api/v1/jobs/{third}").json()["queue_position"] == 2
    assert client.get(f"/api/v1/jobs/{first}").json()["queue_position"] is None


def test_clone_fills_the_form_with_the_jobs_settings_and_auto_again(client: TestClient) -> None:
    (job_id,) = _jobs(
        [JobStatus.succeeded],
        method="lora",
        method_config={"r": 12},
        training={"batch_size": 8, "max_length": 96, "num_epochs": 5, "auto_fields": ["num_epochs"]},
    )

    page = client.get(f"/jobs/new?clone={job_id}", headers=HTML)

    assert page.status_code == 200
    assert 'data-testid="clone-notice"' in page.text
    assert 'name="method_config.r" value="12"' in page.text
    assert 'name="training.batch_size" value="8"' in page.text
    assert 'name="training.max_length" value="96"' in page.text
    # epochs were chosen by auto for the original: auto again
    assert 'name="training.num_epochs" value="auto"' in page.text
    assert 'value="job 0 (copy)"' in page.text
    assert client.get("/jobs/new?clone=999999", headers=HTML).status_code == 404


def test_clone_values_put_auto_back_and_name_the_copy() -> None:
    values = clone_values(
        {"training": {"num_epochs": 7.0, "learning_rate": 0.002, "auto_fields": ["learning_rate"]}},
        "sst2 (copy)",
    )
    assert values["training"] == {"num_epochs": 7.0, "learning_rate": "auto"}
    assert values["name"] == "sst2 (copy)"


@pytest.mark.parametrize(
    ("number", "text"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (22, "22nd")]
)
def test_ordinal(number: int, text: str) -> None:
    assert ordinal(number) == text


def test_cli_watch_shows_the_queue_position_of_a_queued_job(capsys: pytest.CaptureFixture[str]) -> None:
    from app.client.cli import EXIT_TIMEOUT, watch_job

    class QueuedStudio:
        """A studio whose job stays queued, second in its queue."""

        def request(self, method: str, path: str, **_: Any) -> Any:
            if path.endswith("/metrics"):
                return []
            return {
                "status": "queued",
                "current_step": 0,
                "total_steps": None,
                "queue_position": 2,
                "waiting_reason": "no worker with a GPU is connected",
            }

    assert watch_job(QueuedStudio(), 7, interval=0.01, timeout=0) == EXIT_TIMEOUT  # type: ignore[arg-type]

    printed = capsys.readouterr().err
    assert "queued (position 2): no worker with a GPU is connected" in printed
    assert "step 0/?" not in printed


def test_estimate_time_is_measured_from_a_finished_job_of_the_same_model_and_method(
    client: TestClient,
) -> None:
    from datetime import timedelta

    from app.core.presets import estimate_seconds
    from app.core.spec import JobSpec

    with Session(get_engine()) as session:
        dataset = create_dataset(session, sst2_bytes(42))
        spec = JobSpec.model_validate(
            {"dataset_id": dataset.id, "training": {"batch_size": 16, "max_length": 64}}
        )
        # no finished job of this model and method: no time, rather than a guess
        assert estimate_seconds(session, spec, 100) is None
        reference = create_job(session, dataset_id=dataset.id, training={"batch_size": 8, "max_length": 64})
        reference.status, reference.total_steps = JobStatus.succeeded, 50
        assert reference.created_at is not None
        reference.started_at = reference.created_at
        reference.finished_at = reference.created_at + timedelta(seconds=25)  # 0.5 s per step
        session.add(reference)
        session.commit()
        other_method = create_job(session, dataset_id=dataset.id, method="ia3")
        other_method.status, other_method.total_steps = JobStatus.succeeded, 10
        other_method.started_at = other_method.created_at
        other_method.finished_at = other_method.created_at + timedelta(seconds=1000)
        session.add(other_method)
        session.commit()

        estimate = estimate_seconds(session, spec, 100)
        reference_id = reference.id

    assert estimate is not None and estimate.reference_job_id == reference_id
    assert estimate.reference_seconds_per_step == pytest.approx(0.5)
    assert estimate.seconds == pytest.approx(100 * 0.5 * 2)  # twice the examples per step


def test_preset_without_a_dataset_says_so_and_changes_nothing(client: TestClient) -> None:
    answer = client.post("/jobs/new/preset?preset=quick", data={"method": "lora"}, headers=HTML)
    assert answer.status_code == 200
    assert "Choose a dataset first." in answer.text and 'name="training.num_epochs"' not in answer.text
    assert client.post("/jobs/new/preset?preset=nope", data={}, headers=HTML).status_code == 404


def test_method_change_swaps_its_size_knob_into_the_basic_part(client: TestClient) -> None:
    fragment = client.get("/jobs/new/method?method=prompt", headers={"HX-Request": "true"}).text

    section, basic = fragment.split('<div id="method-basic"', 1)
    assert 'hx-swap-oob="true"' in basic and 'name="method_config.num_virtual_tokens"' in basic
    assert 'name="method_config.num_virtual_tokens"' not in section
    assert 'name="method_config.init_text"' in section
    # full fine-tuning has no settings: an empty method section (the swap target stays) and no size knob
    fragment = client.get("/jobs/new/method?method=full", headers={"HX-Request": "true"}).text
    assert 'id="section-method"' in fragment and 'name="method_config.' not in fragment
