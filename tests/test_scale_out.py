"""Scale out on real services: Postgres, Redis, the web app and two worker processes; migrations that start
at the same moment; queue routing by hardware."""

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import sqlalchemy
from alembic.script import ScriptDirectory

from app.core.queue import queue_for, suggest_gpu_class, worker_queues
from app.core.spec import ResourceSettings
from tests.studio import PROJECT_ROOT, RunningStudio, run_studio, sst2_slice, studio_env, wait_for_job

JOBS = 6


@contextmanager
def worker_process(studio: RunningStudio, name: str, log_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m app.cli worker`` with the studio's environment, stopped (warm shutdown) at the end."""
    log = (log_dir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--hostname", f"{name}@%h"],
        cwd=PROJECT_ROOT,
        env=studio.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.e2e
@pytest.mark.services
@pytest.mark.timeout(600)
def test_two_workers_on_one_redis_queue_run_each_job_once(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    # given the web app and two CPU workers on Postgres and Redis
    overrides = {
        "PEFT_STUDIO_DATABASE_URL": postgres_url,
        "PEFT_STUDIO_BROKER_URL": redis_url,
        "PEFT_STUDIO_TORCH_THREADS": "1",
        "PEFT_STUDIO_WORKER_HEARTBEAT_SECONDS": "1",
        "PEFT_STUDIO_WORKER_GPU_COUNT": "0",
    }
    with run_studio(tmp_path / "data", workers=0, **overrides) as studio, ExitStack() as stack:
        names = ["alpha", "beta"]
        for name in names:
            stack.enter_context(worker_process(studio, name, tmp_path))
        client = stack.enter_context(studio.client())
        deadline = time.monotonic() + 120
        while True:
            workers = client.get("/api/v1/workers").json()["data"]
            if len(workers) == 2:
                break
            assert time.monotonic() < deadline, f"workers did not announce themselves: {workers}"
            time.sleep(0.5)
        # they announced CPU-only hardware and listen on the matching queues
        assert {w["name"].split("@")[0] for w in workers} == set(names)
        assert all(w["gpu_count"] == 0 and w["cpu_count"] >= 1 and w["alive"] for w in workers)
        assert all(set(w["queues"]) == {"training", "training.cpu"} for w in workers)

        # when six tiny jobs are queued
        data = sst2_slice(tmp_path / "sst2.csv", 32)
        with data.open("rb") as handle:
            dataset = client.post("/api/v1/datasets", files={"file": ("sst2.csv", handle, "text/csv")}).json()
        training = {"max_steps": 2, "batch_size": 8, "max_length": 32, "logging_steps": 1}
        job_ids = []
        for index in range(JOBS):
            resources = {"accelerator": "cpu"} if index % 2 else {}  # the base queue and training.cpu
            response = client.post(
                "/api/v1/jobs",
                json={
                    "dataset_id": dataset["id"],
                    "name": f"scale-{index}",
                    "validation_fraction": 0,
                    "training": {**training, "seed": index},
                    "resources": resources,
                },
            )
            assert response.status_code == 201, response.text
            job_ids.append(response.json()["id"])
        finished = [wait_for_job(client, job_id, timeout=400) for job_id in job_ids]

        # then every job succeeded, each ran exactly once, and both workers got work
        assert [job["status"] for job in finished] == ["succeeded"] * JOBS, [job["error"] for job in finished]
        for job_id in job_ids:
            events = client.get(f"/api/v1/jobs/{job_id}/events").json()
            starts = [e for e in events if e["kind"] == "status" and e["message"].startswith("running on")]
            assert len(starts) == 1, events
        ran_on = Counter(str(job["worker"]).split("@")[0] for job in finished)
        assert set(ran_on) == set(names), ran_on
        # and the workers page and the jobs page say who ran what
        # (a worker updates its row just after the task returns, so give it a moment)
        deadline = time.monotonic() + 30
        while True:
            workers = client.get("/api/v1/workers").json()["data"]
            if sum(w["jobs_run"] for w in workers) == JOBS or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sum(w["jobs_run"] for w in workers) == JOBS, workers
        assert all(w["current_job_id"] is None for w in workers)
        page = client.get("/workers", headers={"Accept": "text/html"})
        assert page.status_code == 200 and all(f'data-worker="{w["name"]}"' in page.text for w in workers)
        jobs_page = client.get("/jobs", headers={"Accept": "text/html"}).text
        assert all(f'data-worker="{job["worker"]}"' in jobs_page for job in finished)


@pytest.mark.services
@pytest.mark.timeout(180)
def test_two_migrations_started_at_once_both_succeed(tmp_path: Path, postgres_url: str) -> None:
    # given a fresh Postgres database and two processes that migrate it at the same moment
    env = studio_env(tmp_path / "data", PEFT_STUDIO_DATABASE_URL=postgres_url)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "migrate"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]

    # when both finish
    outputs = [process.communicate(timeout=150)[0].decode(errors="replace") for process in processes]

    # then both succeeded (the advisory lock made the second wait) and the schema is complete
    assert [process.returncode for process in processes] == [0, 0], outputs
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            versions = {
                row[0] for row in connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            }
            tables = set(sqlalchemy.inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert versions == set(ScriptDirectory(str(PROJECT_ROOT / "migrations")).get_heads())
    assert {"job", "dataset", "worker"} <= tables


def test_jobs_are_routed_to_queues_that_matching_workers_consume() -> None:
    # a job without needs goes to the queue every worker consumes
    assert queue_for(ResourceSettings(), "training") == "training"
    assert queue_for(ResourceSettings(accelerator="cpu"), "training") == "training.cpu"
    two_big_gpus = ResourceSettings(gpu_class="40gb", num_processes=2)
    assert queue_for(two_big_gpus, "training") == "training.gpu.40gb.x2"
    assert queue_for(ResourceSettings(accelerator="gpu", num_processes=3), "training") == "training.gpu.x4"

    cpu_worker = worker_queues(0, None, "training")
    h100_pair = worker_queues(2, 80 * 1024**3 - 400 * 1024**2, "training")  # an 80 GB card reports ~79.6 GiB
    one_24gb = worker_queues(1, 24 * 1024**3 - 200 * 1024**2, "training")
    assert cpu_worker == ["training", "training.cpu"]
    assert {
        "training",
        "training.gpu",
        "training.gpu.80gb",
        "training.gpu.40gb.x2",
        "training.gpu.80gb.x2",
    } <= set(h100_pair)
    assert "training.gpu.141gb" not in h100_pair and "training.cpu" not in h100_pair
    assert "training.gpu.24gb" in one_24gb and "training.gpu.40gb" not in one_24gb
    assert "training.gpu.x2" not in one_24gb
    # every routed queue has a consumer among the matching workers
    assert queue_for(two_big_gpus, "training") in h100_pair
    assert queue_for(two_big_gpus, "training") not in one_24gb


def test_memory_estimate_suggests_the_smallest_gpu_class_that_fits() -> None:
    assert suggest_gpu_class(1 * 10**9) == "16gb"
    assert suggest_gpu_class(15 * 10**9) == "24gb"
    assert suggest_gpu_class(60 * 10**9) == "80gb"
    assert suggest_gpu_class(500 * 10**9) is None


def test_gpu_class_on_a_cpu_job_is_refused() -> None:
    with pytest.raises(ValueError, match="gpu_class"):
        ResourceSettings(accelerator="cpu", gpu_class="24gb")
