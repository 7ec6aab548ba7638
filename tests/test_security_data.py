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

from app.settings import BUNDLED_MODEL_ID
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
    from app.base_models import bundled_model_path

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
    from app.settings import get_settings

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

    from app.db import get_engine
    from app.models import Job, JobStatus
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

    from app.auth import create_api_token, create_user

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

    from app.db import PROJECT_ROOT
    from app.settings import get_settings

    # given: a database at 0007 with a user's job and an adapter the old worker left without an owner
    fresh = studio_settings.parent / "old.db"
    url = f"sqlite:///{fresh}"
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    monkeypatch.setenv("PEFT_STUDIO_DATABASE_URL", url)
    from app.db import get_engine

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
