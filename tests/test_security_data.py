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
from tests.conftest import Account

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
