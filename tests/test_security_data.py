"""Issue 15, data and ownership: base_model confinement, owners of what a job makes, stream ids after a resume,
the storage quota, pickle weights beside a dummy safetensors file.

Each test here failed on the code before the fix (the issue's probes, turned into tests).
"""

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.settings import BUNDLED_MODEL_ID
from tests import lm
from tests.conftest import Account

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module

CSV = b"text,label\ngood movie,pos\nbad movie,neg\nlovely film,pos\nawful film,neg\ngreat,pos\npoor,neg\n"
NOT_ALLOWED = "is not an allowed base model"


# ---- helpers ------------------------------------------------------------------------------------


def _safetensors(shape: tuple[int, ...] = (4, 8)) -> bytes:
    count = 1
    for dim in shape:
        count *= dim
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 4 * count]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * count)


def _adapter_zip(base_model: str, **extra: bytes) -> bytes:
    studio = {"format": "peft-studio-adapter/1", "method": "lora", "task": "sequence-classification",
              "base_model": base_model, "labels": ["neg", "pos"]}  # fmt: skip
    members = {
        "studio.json": json.dumps(studio).encode(),
        "adapter_config.json": b"{}",
        "adapter_model.safetensors": _safetensors(),
        **extra,
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _model_folder(folder: Path) -> Path:
    """A real transformers model folder (the bundled MiniLM's files, linked, not copied)."""
    from app.core.base_models import bundled_model_path

    folder.mkdir(parents=True, exist_ok=True)
    for path in bundled_model_path().iterdir():
        if path.is_file():
            (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture
def places(
    client: TestClient, studio_settings: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Path]:
    """A registered model folder (and, registered too, the data folder itself: it must stay refused), a model
    in it, a model outside it, and another user's job output folder in the artifact store."""
    from app.core.settings import get_settings

    registered = tmp_path / "models"
    _model_folder(registered / "minilm")
    _model_folder(tmp_path / "elsewhere" / "minilm")
    artifacts = get_settings().resolved_artifact_root
    victim = _model_folder(artifacts / "jobs" / "5" / "adapter")
    (registered / "link-to-artifacts").symlink_to(victim, target_is_directory=True)
    monkeypatch.setenv("PEFT_STUDIO_MODEL_FOLDERS", json.dumps([str(registered), str(studio_settings)]))
    get_settings.cache_clear()
    return {"registered": registered, "data": studio_settings, "artifacts": artifacts, "tmp": tmp_path}


def _cases(p: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(label, base_model, allowed)."""
    registered, data, artifacts, tmp = p["registered"], p["data"], p["artifacts"], p["tmp"]
    return [
        ("bundled id", BUNDLED_MODEL_ID, True),
        ("a model in a registered folder", str(registered / "minilm"), True),
        ("another user's job output", str(artifacts / "jobs" / "5" / "adapter"), False),
        ("a job output that does not exist", str(artifacts / "jobs" / "999" / "adapter"), False),
        ("the data folder (registered, still refused)", str(data), False),
        ("/etc", "/etc", False),
        (
            "a symlink from a registered folder into the artifacts",
            str(registered / "link-to-artifacts"),
            False,
        ),
        (
            "'..' out of a registered folder",
            f"{registered}/../models/../../data/artifacts/jobs/5/adapter",
            False,
        ),
        ("'..' relative", "../../../../etc", False),
        ("a real model folder that is not registered", str(tmp / "elsewhere" / "minilm"), False),
        ("a missing folder in a registered one", str(registered / "missing"), False),
        ("a hub id not in the cache", "some-org/not-downloaded", False),
        ("home folder", "~/.ssh", False),
    ]


def _message(body: dict[str, Any]) -> str:
    return json.dumps(body)


# ---- 1. base_model confinement --------------------------------------------------------------------


def test_job_base_model_is_confined_to_allowed_models(
    client: TestClient, other_user: Account, places: dict[str, Path]
) -> None:
    # given: bob's dataset
    upload = client.post(
        "/api/v1/datasets", files={"file": ("r.csv", CSV, "text/csv")}, headers=other_user.headers
    )
    assert upload.status_code == 201, upload.text
    dataset_id = upload.json()["id"]
    refusals: dict[str, str] = {}
    for label, base_model, allowed in _cases(places):
        spec = {"dataset_id": dataset_id, "base_model": base_model, "training": {"max_steps": 1}}
        # when: bob (and, for the refused ones, the admin too) creates a job with it
        for headers in [other_user.headers] if allowed else [other_user.headers, {}]:
            response = client.post("/api/v1/jobs", json=spec, headers=headers)
            # then
            if allowed:
                assert response.status_code == 201, (label, response.text)
            else:
                assert response.status_code == 422, (label, response.text)
                text = response.text
                assert NOT_ALLOWED in text, (label, text)
                refusals[label] = text.replace(json.dumps(base_model)[1:-1], "<base_model>")
    # one message whatever the reason: an existing folder reads like a missing one
    assert len(set(refusals.values())) == 1, refusals


def test_adapter_import_base_model_is_confined(
    client: TestClient, other_user: Account, places: dict[str, Path]
) -> None:
    refusals: dict[str, str] = {}
    for label, base_model, allowed in _cases(places):
        response = client.post(
            "/api/v1/adapters/import",
            files={"file": ("a.zip", _adapter_zip(base_model), "application/zip")},
            headers=other_user.headers,
        )
        if allowed:
            assert response.status_code == 201, (label, response.text)
        else:
            assert response.status_code == 422, (label, response.text)
            assert NOT_ALLOWED in response.text, (label, response.text)
            refusals[label] = response.text.replace(json.dumps(base_model)[1:-1], "<base_model>")
    assert len(set(refusals.values())) == 1, refusals
    listed = client.get("/api/v1/adapters", headers=other_user.headers).json()
    assert listed["count"] == 2  # only the two allowed ones were kept


def test_sweep_and_openai_layer_use_the_same_rule(
    client: TestClient, other_user: Account, places: dict[str, Path]
) -> None:
    upload = client.post(
        "/api/v1/datasets", files={"file": ("r.csv", CSV, "text/csv")}, headers=other_user.headers
    )
    dataset_id = upload.json()["id"]
    victim = str(places["artifacts"] / "jobs" / "5" / "adapter")
    sweep = client.post(
        "/api/v1/sweeps",
        json={
            "base": {"dataset_id": dataset_id, "training": {"max_steps": 1}},
            "grid": {"base_model": [victim]},
        },
        headers=other_user.headers,
    )
    assert sweep.status_code == 422 and NOT_ALLOWED in sweep.text, sweep.text
    rows = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(4))
    uploaded = client.post(
        "/v1/files",
        files={"file": ("pc.jsonl", rows, "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers=other_user.headers,
    )
    assert uploaded.status_code in (200, 201), uploaded.text
    openai = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": victim, "training_file": uploaded.json()["id"]},
        headers=other_user.headers,
    )
    assert openai.status_code in (400, 422) and NOT_ALLOWED in openai.text, openai.text


def test_worker_refuses_a_base_model_outside_the_allowed_places(
    studio_settings: Path, places: dict[str, Path]
) -> None:
    """Defence in depth: a job row written without validation still does not load another user's folder."""
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Job, JobStatus
    from tests.factories import create_dataset, create_job
    from worker.engine import run_job

    with Session(get_engine()) as session:
        dataset = create_dataset(session, CSV)
        victim = str(places["artifacts"] / "jobs" / "5" / "adapter")
        job = create_job(session, dataset_id=dataset.id, base_model=victim, training={"max_steps": 1})
        with pytest.raises(Exception, match=NOT_ALLOWED):
            run_job(job.id)
        session.expire_all()
        failed = session.get(Job, job.id)
        assert failed is not None and failed.status == JobStatus.failed
        assert NOT_ALLOWED in (failed.error or "")


# ---- 2. what a job makes belongs to the job's owner -------------------------------------------------


def _accounts(data_dir: Path, *names: str) -> dict[str, str]:
    """Non-admin users with an API token each, made straight in a running studio's SQLite database."""
    from sqlalchemy import create_engine
    from sqlmodel import Session

    from app.services.accounts import create_api_token, create_user

    engine = create_engine(f"sqlite:///{data_dir / 'studio.db'}", connect_args={"timeout": 30})
    tokens: dict[str, str] = {}
    try:
        with Session(engine) as session:
            for name in names:
                user = create_user(session, name, f"{name}-password-123")
                tokens[name] = create_api_token(session, user, "tests")[1]
    finally:
        engine.dispose()
    return tokens


def test_a_non_admin_owns_the_adapter_their_job_makes(tmp_path: Path, tiny_lm: Path) -> None:
    """The issue's owner matrix on a real studio with its real worker: alice (not an admin) uploads, trains,
    lists, opens, downloads, tries out and chats with her adapter; bob gets 404 for every one of them."""
    from tests.lm import alpaca_rows, json_bytes
    from tests.studio import run_studio, wait_for_job

    with run_studio(tmp_path / "data", PEFT_STUDIO_TORCH_THREADS="1") as studio:
        tokens = _accounts(studio.data_dir, "alice", "bob")
        with studio.client(token=tokens["alice"]) as alice, studio.client(token=tokens["bob"]) as bob:
            # given: alice's dataset and a finished causal-LM job of hers
            upload = alice.post(
                "/api/v1/datasets",
                files={"file": ("alpaca.json", json_bytes(alpaca_rows(16)), "application/json")},
            )
            assert upload.status_code == 201, upload.text
            spec = {
                "task": "causal-lm",
                "base_model": str(tiny_lm),
                "dataset_id": upload.json()["id"],
                "training": {"max_steps": 2, "batch_size": 4, "max_length": 128, "logging_steps": 1},
            }
            created = alice.post("/api/v1/jobs", json=spec)
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            finished = wait_for_job(alice, job_id)
            assert finished["status"] == "succeeded", finished
            # then: the adapter is hers
            listed = alice.get("/api/v1/adapters").json()
            assert listed["count"] == 1, listed
            adapter_id = listed["data"][0]["id"]
            model = next(
                m["id"] for m in alice.get("/v1/models").json()["data"] if m["id"].endswith(f"ftjob-{job_id}")
            )
            chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            requests: list[tuple[str, str, dict[str, Any]]] = [
                ("GET", f"/api/v1/adapters/{adapter_id}", {}),
                ("GET", f"/api/v1/adapters/{adapter_id}/download", {}),
                (
                    "POST",
                    f"/api/v1/adapters/{adapter_id}/generate",
                    {"json": {"prompt": "hi", "max_new_tokens": 4}},
                ),
                ("POST", "/v1/chat/completions", {"json": chat}),
            ]
            for method, path, kwargs in requests:
                mine = alice.request(method, path, **kwargs)
                assert mine.status_code == 200, (path, mine.status_code, mine.text[:300])
            assert zipfile.ZipFile(
                io.BytesIO(alice.get(f"/api/v1/adapters/{adapter_id}/download").content)
            ).namelist()
            # and: bob sees none of it
            assert bob.get("/api/v1/adapters").json()["count"] == 0
            assert all(not m["id"].endswith(f"ftjob-{job_id}") for m in bob.get("/v1/models").json()["data"])
            for method, path, kwargs in requests:
                theirs = bob.request(method, path, **kwargs)
                assert theirs.status_code == 404, (path, theirs.status_code, theirs.text[:300])


def test_migration_gives_ownerless_adapters_their_jobs_owner(
    studio_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows the old worker wrote (adapter.owner_id NULL) get their job's owner at upgrade, not the admin's."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from app.core.db import PROJECT_ROOT
    from app.core.settings import get_settings

    # given: a database at 0007 with a user's job and an adapter the old worker left without an owner
    fresh = studio_settings.parent / "old.db"
    url = f"sqlite:///{fresh}"
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    monkeypatch.setenv("PEFT_STUDIO_DATABASE_URL", url)
    from app.core.db import get_engine

    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        command.upgrade(config, "0007")
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO user (id, username, is_admin, is_active, created_at) VALUES (7, 'carol', 0, 1, '2026-01-01')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO job (id, owner_id, name, status, spec, method, base_model, progress, current_step, "
                    "cancel_requested, created_at, attempt) VALUES (3, 7, 'j', 'succeeded', '{}', 'lora', 'm', 1, 0, 0, "
                    "'2026-01-01', 1)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO adapter (id, owner_id, job_id, name, method, task, base_model, storage_key, size_bytes, "
                    "files, trainable_params, total_params, labels, metrics, created_at) VALUES (4, NULL, 3, 'a', 'lora', "
                    "'causal-lm', 'm', 'k', 1, '[]', 1, 1, '[]', '{}', '2026-01-01')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO metricpoint (id, job_id, step, split, \"values\", created_at) VALUES (8, 3, 1, 'train', '{}', '2026-01-01')"
                )
            )
        # when: upgraded
        command.upgrade(config, "heads")
        # then: the adapter is carol's, and ids stay unique even above a deleted highest one
        with engine.begin() as connection:
            assert connection.execute(text("SELECT owner_id FROM adapter WHERE id = 4")).scalar() == 7
            tables = dict(
                connection.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'")).all()
            )
            for table in ("job", "dataset", "adapter", "metricpoint", "jobevent"):
                assert "AUTOINCREMENT" in tables[table], table
            connection.execute(text("DELETE FROM metricpoint WHERE id = 8"))
            connection.execute(
                text(
                    "INSERT INTO metricpoint (job_id, step, split, \"values\", created_at) VALUES (3, 1, 'train', '{}', '2026-01-01')"
                )
            )
            new_id = connection.execute(text("SELECT max(id) FROM metricpoint")).scalar()
            assert new_id is not None and new_id > 8
            assert connection.execute(text("PRAGMA foreign_key_check")).fetchall() == []
        engine.dispose()
    finally:
        monkeypatch.delenv("PEFT_STUDIO_DATABASE_URL")
        get_settings.cache_clear()
        get_engine.cache_clear()


# ---- 3. ids after a resume, the stream's reset, a superseded writer ----------------------------------


def _running_job(session: Any, attempt: int = 1, token: str = "token-1") -> Any:
    from app.core.models import JobStatus
    from tests.factories import create_dataset, create_job

    dataset = create_dataset(session, CSV)
    job = create_job(session, dataset_id=dataset.id, training={"max_steps": 10})
    job.status, job.attempt, job.run_token, job.total_steps = JobStatus.running, attempt, token, 10
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def _write_points(job_id: int, steps: list[int], attempt: int, token: str) -> list[int]:
    """Points through the worker's own writer, fenced by the run token; their ids."""
    from sqlmodel import Session, col, select

    from app.core.db import get_engine
    from app.core.models import MetricPoint, utcnow
    from worker.reporting import MetricWriter

    writer = MetricWriter(job_id, cancel_poll=0.05, run_token=token, attempt=attempt)
    for step in steps:
        writer.put(
            {
                "point": {
                    "step": step,
                    "split": "train",
                    "values": {"loss": float(step)},
                    "created_at": utcnow(),
                }
            }
        )
    writer.close()
    with Session(get_engine()) as session:
        rows = session.exec(
            select(MetricPoint.id)
            .where(MetricPoint.job_id == job_id, MetricPoint.attempt == attempt)
            .order_by(col(MetricPoint.id))
        ).all()
    return [int(i) for i in rows]


def _stream(client: TestClient, job_id: int, last_event_id: int) -> list[Any]:
    from tests.sse import read_events

    with client.stream(
        "GET", f"/api/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": str(last_event_id)}
    ) as response:
        assert response.status_code == 200
        return [event for event in read_events(response) if event.event in ("metric", "reset", "end")]


def test_resumed_points_get_new_ids_and_the_stream_resets(client: TestClient, tmp_path: Path) -> None:
    from sqlmodel import Session, func, select

    from app.core.db import get_engine
    from app.core.models import Checkpoint, Job, JobStatus, MetricPoint
    from app.core.storage import get_store
    from app.services import checkpoints
    from worker.resilience import prepare_resume

    with Session(get_engine()) as session:
        # given: attempt 1 logged steps 1..10 and saved a checkpoint at step 5, then its worker died
        job = _running_job(session)
        first = _write_points(job.id, list(range(1, 11)), attempt=1, token="token-1")
        highest_ever = max(first)
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
        key = checkpoints.checkpoint_key(job.id, 5)
        get_store().put_dir(tmp_path / "ckpt", key)
        session.add(Checkpoint(job_id=job.id, step=5, storage_key=key))
        job.attempt, job.run_token = 2, "token-2"
        session.add(job)
        session.commit()
        # when: attempt 2 resumes (deleting the points after step 5) and logs steps 6..8
        prepare_resume(job.id, get_store(), tmp_path / "work")
        kept = session.exec(
            select(func.count()).select_from(MetricPoint).where(MetricPoint.job_id == job.id)
        ).one()
        assert kept == 5
        second = _write_points(job.id, [6, 7, 8], attempt=2, token="token-2")
        # then: every new id is above every id ever issued (SQLite would have reused 6..10)
        assert min(second) > highest_ever, (first, second)
        finished = session.get(Job, job.id)
        assert finished is not None
        finished.status = JobStatus.succeeded
        session.add(finished)
        session.commit()
        job_id = job.id

    # a stream continuing after a point the resume deleted: reset to step 5, then exactly the new points
    events = _stream(client, job_id, first[-1])
    assert [e.event for e in events] == ["reset", "metric", "metric", "metric", "end"]
    assert json.loads(events[0].data) == {"step": 5, "attempt": None, "points": 5}
    assert [int(e.id) for e in events[1:4]] == second
    assert [json.loads(e.data)["attempt"] for e in events[1:4]] == [2, 2, 2]
    # a stream continuing after a kept point (step 3) held nothing that was replaced: no reset, steps 4..8
    events = _stream(client, job_id, first[2])
    assert [e.event for e in events] == ["metric"] * 5 + ["end"]
    assert [json.loads(e.data)["step"] for e in events[:5]] == [4, 5, 6, 7, 8]
    assert [int(e.id) for e in events[2:5]] == second
    # a fresh viewer gets every point in order, with no reset
    events = _stream(client, job_id, 0)
    assert [e.event for e in events].count("reset") == 0
    assert [json.loads(e.data)["step"] for e in events if e.event == "metric"] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_superseded_writer_writes_nothing(client: TestClient) -> None:
    """The run token changes under a live writer (the job was requeued to another worker): from then on no
    point and no heartbeat of the old run lands, and the writer tells the training loop to stop."""
    import time

    from sqlmodel import Session, func, select

    from app.core.db import get_engine
    from app.core.models import Job, MetricPoint, utcnow
    from worker.reporting import MetricWriter
    from worker.resilience import Heartbeat

    with Session(get_engine()) as session:
        job = _running_job(session, token="old-token")
        heartbeat = Heartbeat(job.id, "old-token", interval=0.05)
        writer = MetricWriter(job.id, cancel_poll=0.05, run_token="old-token", attempt=1, lost=heartbeat.lost)
        heartbeat.start()
        writer.put({"point": {"step": 1, "split": "train", "values": {"loss": 1.0}, "created_at": utcnow()}})
        deadline = time.monotonic() + 30
        while (
            session.exec(
                select(func.count()).select_from(MetricPoint).where(MetricPoint.job_id == job.id)
            ).one()
            < 1
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # when: another worker takes the job over (new token), and the old run keeps logging
        job.run_token, job.attempt = "new-token", 2
        job.heartbeat_at = stamp = utcnow()
        session.add(job)
        session.commit()
        for step in range(2, 40):
            writer.put(
                {"point": {"step": step, "split": "train", "values": {"loss": 1.0}, "created_at": utcnow()}}
            )
            writer.put({"progress": {"current_step": step, "progress": step / 40}})
        writer.close()
        while not heartbeat.lost.is_set():  # the heartbeat notices too, within its interval
            assert time.monotonic() < deadline
            time.sleep(0.05)
        heartbeat.stop()
        # then: only the point written before the takeover is there, and the job row is untouched
        session.expire_all()
        points = session.exec(select(MetricPoint.step).where(MetricPoint.job_id == job.id)).all()
        assert list(points) == [1]
        after = session.get(Job, job.id)
        assert after is not None and after.current_step != 39 and after.run_token == "new-token"
        assert after.heartbeat_at is not None and after.heartbeat_at.replace(tzinfo=None) == stamp.replace(
            tzinfo=None
        )
        assert writer.lost.is_set()


# ---- 4. minor: workers page, storage quota, pickle weights beside a dummy safetensors file -----------


def test_workers_show_a_job_only_to_its_owner_and_admins(
    client: TestClient, make_user: Any, other_user: Account
) -> None:
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Job, JobStatus, Worker

    alice = make_user("alice")
    with Session(get_engine()) as session:
        job = Job(name="alice-secret-run", spec={}, method="lora", base_model="m", owner_id=alice.id,
                  status=JobStatus.running)  # fmt: skip
        session.add(job)
        session.commit()
        session.refresh(job)
        session.add(Worker(name="w1@host", hostname="host", queues=["training"], current_job_id=job.id))
        session.commit()
        job_id = job.id
    for headers, sees in ((other_user.headers, False), (alice.headers, True), ({}, True)):
        listed = client.get("/api/v1/workers", headers=headers).json()["data"]
        assert len(listed) == 1 and listed[0]["busy"] is True
        assert listed[0]["current_job_id"] == (job_id if sees else None)
        page = client.get("/workers", headers=headers).text
        assert ("alice-secret-run" in page) is sees
        assert (f"/jobs/{job_id}" in page) is sees


def test_storage_quota_counts_unpacked_sizes(
    client: TestClient, other_user: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.settings import get_settings

    monkeypatch.setenv("PEFT_STUDIO_STORAGE_QUOTA_BYTES", str(200_000))
    get_settings.cache_clear()
    # given: bob's first dataset fits
    first = client.post(
        "/api/v1/datasets", files={"file": ("r.csv", CSV, "text/csv")}, headers=other_user.headers
    )
    assert first.status_code == 201, first.text
    # when: an adapter zip of a few kB that unpacks to 1 MB (zeros compress well)
    bomb = _adapter_zip(BUNDLED_MODEL_ID, **{"padding.safetensors": _safetensors((256, 1024))})
    assert len(bomb) < 20_000
    refused = client.post(
        "/api/v1/adapters/import",
        files={"file": ("a.zip", bomb, "application/zip")},
        headers=other_user.headers,
    )
    # then: refused by its unpacked size, the message naming usage and quota
    assert refused.status_code == 413, refused.text
    detail = refused.json()["detail"]
    assert "quota" in detail and f"{len(CSV):,} of 200,000 bytes" in detail, detail
    assert client.get("/api/v1/adapters", headers=other_user.headers).json()["count"] == 0
    # a small one still fits, and then a dataset that would pass the quota is refused too
    assert (
        client.post(
            "/api/v1/adapters/import",
            files={"file": ("a.zip", _adapter_zip(BUNDLED_MODEL_ID), "application/zip")},
            headers=other_user.headers,
        ).status_code
        == 201
    )
    big = b"text,label\n" + b"".join(f"row {i} {'x' * 180},pos\n".encode() for i in range(1100))
    too_much = client.post(
        "/api/v1/datasets", files={"file": ("big.csv", big, "text/csv")}, headers=other_user.headers
    )
    assert too_much.status_code == 413 and "quota" in too_much.text, too_much.text
    # the admin is not limited
    assert client.post("/api/v1/datasets", files={"file": ("big.csv", big, "text/csv")}).status_code == 201
    # 0: unlimited
    monkeypatch.setenv("PEFT_STUDIO_STORAGE_QUOTA_BYTES", "0")
    get_settings.cache_clear()
    again = client.post(
        "/api/v1/datasets", files={"file": ("big.csv", big, "text/csv")}, headers=other_user.headers
    )
    assert again.status_code == 201, again.text


def test_pickle_weights_beside_a_dummy_safetensors_file_are_refused(
    client: TestClient, other_user: Account, places: dict[str, Path]
) -> None:
    # given: a registered model folder whose real weights are a pickle, with a zero-tensor safetensors beside
    folder = places["registered"] / "pickled"
    _model_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(_safetensors((0,)))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    upload = client.post(
        "/api/v1/datasets", files={"file": ("r.csv", CSV, "text/csv")}, headers=other_user.headers
    )
    spec = {"dataset_id": upload.json()["id"], "base_model": str(folder), "training": {"max_steps": 1}}
    # when / then
    response = client.post("/api/v1/jobs", json=spec, headers=other_user.headers)
    assert response.status_code == 422 and "pickle" in response.text, response.text


def test_a_live_stream_resets_when_a_resume_replaces_what_it_sent(client: TestClient, tmp_path: Path) -> None:
    """The viewer is connected across the resume: it was sent steps 1..10, the resume deletes 6..10, the new
    attempt logs 6..8: the stream says reset (keep up to step 5), then sends the new points."""
    import threading
    import time

    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Checkpoint, Job, JobStatus
    from app.core.storage import get_store
    from app.services import checkpoints
    from tests.sse import read_events
    from worker.resilience import prepare_resume

    with Session(get_engine()) as session:
        job = _running_job(session)
        job_id = job.id
    _write_points(job_id, list(range(1, 11)), attempt=1, token="token-1")
    received: list[Any] = []

    def watch() -> None:
        with client.stream("GET", f"/api/v1/jobs/{job_id}/stream") as response:
            for event in read_events(response):
                if event.event in ("metric", "reset", "end"):
                    received.append(event)
                if event.event == "end":
                    return

    viewer = threading.Thread(target=watch, daemon=True)
    viewer.start()
    deadline = time.monotonic() + 30
    while len(received) < 10:
        assert time.monotonic() < deadline, received
        time.sleep(0.05)
    # the worker died; the next attempt resumes from the checkpoint at step 5
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
    key = checkpoints.checkpoint_key(job_id, 5)
    get_store().put_dir(tmp_path / "ckpt", key)
    with Session(get_engine()) as session:
        session.add(Checkpoint(job_id=job_id, step=5, storage_key=key))
        resumed = session.get(Job, job_id)
        assert resumed is not None
        resumed.attempt, resumed.run_token = 2, "token-2"
        session.add(resumed)
        session.commit()
    prepare_resume(job_id, get_store(), tmp_path / "work")
    second = _write_points(job_id, [6, 7, 8], attempt=2, token="token-2")
    with Session(get_engine()) as session:
        done = session.get(Job, job_id)
        assert done is not None
        done.status = JobStatus.succeeded
        session.add(done)
        session.commit()
    viewer.join(timeout=30)
    assert not viewer.is_alive()
    kinds = [e.event for e in received]
    assert kinds == ["metric"] * 10 + ["reset"] + ["metric"] * 3 + ["end"], kinds
    assert json.loads(received[10].data) == {"step": 5, "attempt": 2, "points": 5}
    assert [int(e.id) for e in received[11:14]] == second


@pytest.mark.browser
@pytest.mark.timeout(900)
def test_the_job_chart_drops_replaced_points_on_reset(tmp_path: Path, chromium_path: str) -> None:
    """The job page in Chromium: it shows steps 1..10 of attempt 1; a resume replaces 6..10 with attempt 2's
    6..8; the chart ends with 8 loss points (1..5 and the new 6..8) and the page counts 8 points."""
    from playwright.sync_api import sync_playwright
    from sqlalchemy import create_engine, text

    from tests.conftest import CHROMIUM_ARGS
    from tests.studio import run_studio

    with run_studio(tmp_path / "data", workers=0) as studio, sync_playwright() as playwright:
        api = studio.client()
        dataset = api.post("/api/v1/datasets", files={"file": ("r.csv", CSV, "text/csv")}).json()
        job = api.post(
            "/api/v1/jobs", json={"dataset_id": dataset["id"], "training": {"max_steps": 10}}
        ).json()
        engine = create_engine(f"sqlite:///{studio.data_dir / 'studio.db'}", connect_args={"timeout": 30})

        def points(steps: range, attempt: int) -> None:
            with engine.begin() as connection:
                for step in steps:
                    connection.execute(
                        text(
                            'INSERT INTO metricpoint (job_id, step, split, "values", created_at, attempt) '
                            "VALUES (:job, :step, 'train', :values, '2026-12-02 00:00:00', :attempt)"
                        ),
                        {
                            "job": job["id"],
                            "step": step,
                            "values": json.dumps({"loss": 10.0 - step}),
                            "attempt": attempt,
                        },
                    )

        with engine.begin() as connection:
            connection.execute(
                text("UPDATE job SET status = 'running', attempt = 1 WHERE id = :job"), {"job": job["id"]}
            )
        points(range(1, 11), attempt=1)
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            studio.open_page(page, f"/jobs/{job['id']}")
            page.wait_for_function("() => document.getElementById('job-live').dataset.points === '10'")
            # when: the job resumes from its checkpoint at step 5 and the new attempt logs 6..8
            with engine.begin() as connection:
                connection.execute(
                    text("DELETE FROM metricpoint WHERE job_id = :job AND step > 5"), {"job": job["id"]}
                )
                connection.execute(text("UPDATE job SET attempt = 2 WHERE id = :job"), {"job": job["id"]})
            points(range(6, 9), attempt=2)
            with engine.begin() as connection:
                connection.execute(
                    text("UPDATE job SET status = 'succeeded' WHERE id = :job"), {"job": job["id"]}
                )
            page.wait_for_function("() => document.getElementById('job-live').dataset.streamEnded === 'true'")
            page.wait_for_timeout(300)  # the chart redraws on a 100 ms timer
            # then
            live = page.locator("#job-live")
            assert live.get_attribute("data-resets") == "1"
            assert live.get_attribute("data-reset-step") == "5"
            assert live.get_attribute("data-points") == "8"
            assert (
                page.locator('[data-series="train.loss,eval.loss"]').get_attribute("data-point-count") == "8"
            )
            assert page.locator('[data-metric="train.loss"]').get_attribute("data-value") == "2"
        finally:
            browser.close()
            engine.dispose()
