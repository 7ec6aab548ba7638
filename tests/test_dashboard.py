"""The dashboard's numbers: eval metrics against scikit-learn, what the trainer logged against what the studio
serves, telemetry, the confusion matrix, config diff and summary of the compare view, TensorBoard and MLflow."""

import io
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sqlalchemy import insert

from app.services.compare import config_diff, flatten
from tests.factories import create_job, sst2_bytes

# ---- metrics against scikit-learn -------------------------------------------------------------


@pytest.mark.parametrize(("classes", "rows", "seed"), [(2, 50, 0), (3, 200, 1), (6, 37, 2), (4, 9, 3)])
def test_accuracy_f1_and_confusion_matrix_match_scikit_learn(classes: int, rows: int, seed: int) -> None:
    from transformers import EvalPrediction

    from worker.recipes.classification import ClassificationMetrics

    # given: random logits and labels (some classes may never be predicted, or never occur)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, classes)).astype(np.float32)
    truth = rng.integers(0, classes, size=rows)
    labels = [f"class-{i}" for i in range(classes)]
    metrics = ClassificationMetrics(labels)

    # when
    result = metrics(EvalPrediction(predictions=logits, label_ids=truth))

    # then
    predicted = logits.argmax(axis=-1)
    assert result["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert result["f1_macro"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12)
    matrix = metrics.last_structured["confusion_matrix"]  # type: ignore[index]
    assert matrix["labels"] == labels
    assert matrix["matrix"] == sk_confusion_matrix(truth, predicted, labels=list(range(classes))).tolist()


# ---- config diff ------------------------------------------------------------------------------


def test_config_diff_lists_only_the_fields_that_differ() -> None:
    base = {
        "name": "a",
        "method": "lora",
        "training": {"learning_rate": 0.001, "batch_size": 8},
        "method_config": {"r": 8},
    }
    other = {
        "name": "b",
        "method": "lora",
        "training": {"learning_rate": 0.002, "batch_size": 8},
        "method_config": {"r": 8},
    }
    third = {
        "name": "c",
        "method": "ia3",
        "training": {"learning_rate": 0.001, "batch_size": 8},
        "method_config": {},
    }
    assert config_diff([base, other]) == [{"field": "training.learning_rate", "values": [0.001, 0.002]}]
    assert config_diff([base, base]) == []
    rows = {row["field"]: row["values"] for row in config_diff([base, other, third])}
    assert rows == {
        "method": ["lora", "lora", "ia3"],
        "method_config.r": [8, 8, None],  # ia3 has no rank
        "training.learning_rate": [0.001, 0.002, 0.001],
    }
    assert flatten({"a": {"b": [1, 2]}, "c": None}) == {"a.b": [1, 2], "c": None}


def _fake_finished_job(session: Any, dataset_id: int, lr: float, accuracies: list[float], rss: float) -> int:
    from datetime import timedelta

    from app.core.models import Adapter, JobStatus, MetricPoint, utcnow

    job = create_job(session, dataset_id=dataset_id, training={"learning_rate": lr, "max_steps": 10})
    job.status = JobStatus.succeeded
    job.finished_at = utcnow()
    job.started_at = job.finished_at - timedelta(seconds=95)
    session.add(job)
    session.add(
        Adapter(
            job_id=job.id,
            name="a",
            method="lora",
            task="sequence-classification",
            base_model="m",
            storage_key="k",
            size_bytes=1,
            trainable_params=1_000,
            total_params=100_000,
        )
    )
    rows = [
        {
            "job_id": job.id,
            "step": s,
            "split": "train",
            "values": {"loss": 1.0 / s, "peak_rss_mb": rss - 10 + s},
        }
        for s in range(1, 11)
    ]
    rows += [
        {"job_id": job.id, "step": 5 * (i + 1), "split": "eval", "values": {"loss": 1.0 - a, "accuracy": a}}
        for i, a in enumerate(accuracies)
    ]
    session.execute(insert(MetricPoint), rows)
    session.commit()
    assert job.id is not None
    return job.id


def test_compare_view_summary_and_diff(client: Any) -> None:
    from sqlmodel import Session

    from app.core.db import get_engine

    # given: two finished jobs that differ only in learning rate
    dataset_id = client.post("/api/v1/datasets", files={"file": ("d.csv", sst2_bytes(40))}).json()["id"]
    with Session(get_engine()) as session:
        first = _fake_finished_job(session, dataset_id, 0.001, [0.6, 0.8, 0.7], rss=500)
        second = _fake_finished_job(session, dataset_id, 0.002, [0.5, 0.55], rss=700)

    # when
    body = client.get("/api/v1/compare", params={"jobs": f"{first},{second}"}).json()

    # then: the diff has exactly the changed field; the summary has best and final scores, memory, size, time
    assert body["diff"] == [{"field": "training.learning_rate", "values": [0.001, 0.002]}]
    one, two = body["summary"]
    assert (one["best_metric"], one["final_metric"], one["metric"]) == (0.8, 0.7, "accuracy")
    assert (two["best_metric"], two["final_metric"]) == (0.55, 0.55)
    assert one["best_eval_loss"] == pytest.approx(0.2) and one["final_eval_loss"] == pytest.approx(0.3)
    assert one["peak_rss_mb"] == 500 and two["peak_rss_mb"] == 700
    assert one["trainable_params"] == 1_000 and one["trainable_percent"] == pytest.approx(1.0)
    assert one["wall_seconds"] == pytest.approx(95)

    # then: the page shows the same, and only the changed field in the diff table
    page = client.get(f"/compare?jobs={first}&jobs={second}", headers={"Accept": "text/html"}).text
    assert page.count('<tr data-field="') == 1 and 'data-field="training.learning_rate"' in page
    assert f'data-job-ids="{first},{second}"' in page
    assert "1m 35s" in page and "500 MB RSS" in page
    fragment = client.get(f"/compare/summary?jobs={first},{second}", headers={"Accept": "text/html"})
    assert fragment.status_code == 200 and "every 3s" not in fragment.text  # nothing runs: no polling

    # then: bad or unknown ids are clear errors
    assert client.get("/api/v1/compare", params={"jobs": "1,abc"}).status_code == 422
    missing = client.get("/api/v1/compare", params={"jobs": f"{first},999"})
    assert missing.status_code == 404 and "999" in missing.json()["detail"]
    assert client.get("/compare", headers={"Accept": "text/html"}).status_code == 200  # the picker


# ---- a real run: logged values, telemetry, confusion matrix, TensorBoard, MLflow ---------------


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under a folder, read with the TensorBoard protobufs (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event files in {folder}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture
def trainer_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every dict transformers.Trainer.log was given, copied before any callback sees it."""
    from transformers import Trainer

    logged: list[dict[str, Any]] = []
    original = Trainer.log

    def log(self: Any, logs: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        original(self, logs, *args, **kwargs)
        logged.append({**dict(logs), "step": self.state.global_step})

    monkeypatch.setattr(Trainer, "log", log)
    yield logged


@pytest.mark.timeout(900)
def test_a_run_serves_what_the_trainer_logged_and_reports_to_trackers(
    client: Any, tmp_path: Path, trainer_logs: list[dict[str, Any]]
) -> None:
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Job, JobStatus
    from worker.engine import run_job

    # given: a tiny LoRA job with TensorBoard and MLflow (a local SQLite store) switched on
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dataset_id = client.post("/api/v1/datasets", files={"file": ("d.csv", sst2_bytes(64))}).json()["id"]
    with Session(get_engine()) as session:
        job = create_job(
            session,
            dataset_id=dataset_id,
            validation_fraction=0.25,
            training={"max_steps": 4, "batch_size": 8, "max_length": 32, "logging_steps": 1, "eval_steps": 2},
            tracking={"tensorboard": True, "mlflow": True, "mlflow_tracking_uri": mlflow_uri},
        )
        job_id = job.id
    assert job_id is not None

    # when
    run_job(job_id)

    # then: it succeeded, and the series endpoint serves exactly the values the trainer logged
    with Session(get_engine()) as session:
        finished = session.get(Job, job_id)
        assert finished is not None and finished.status == JobStatus.succeeded, finished.error
        evaluation = finished.evaluation
    series = client.get(f"/api/v1/jobs/{job_id}/series").json()["series"]
    train_logs = [log for log in trainer_logs if "loss" in log and "train_loss" not in log]
    eval_logs = [log for log in trainer_logs if "eval_loss" in log]
    assert len(train_logs) == 4 and len(eval_logs) == 2
    for name in ("loss", "learning_rate", "grad_norm"):
        assert series[f"train.{name}"]["x"] == [log["step"] for log in train_logs]
        assert series[f"train.{name}"]["y"] == [float(log[name]) for log in train_logs]
    for name in ("loss", "accuracy", "f1_macro"):
        assert series[f"eval.{name}"]["x"] == [2, 4]
        assert series[f"eval.{name}"]["y"] == [float(log[f"eval_{name}"]) for log in eval_logs]

    # then: telemetry: peak RSS and tokens per second on every training log
    assert len(series["train.peak_rss_mb"]["y"]) == 4 and min(series["train.peak_rss_mb"]["y"]) > 50
    assert (
        len(series["train.tokens_per_second"]["y"]) >= 3 and min(series["train.tokens_per_second"]["y"]) > 0
    )
    assert len(series["train.samples_per_second"]["y"]) >= 3

    # then: the confusion matrix of the last evaluation is on the job (16 held-out rows) and on its page
    matrix = evaluation["confusion_matrix"]  # type: ignore[index]
    assert matrix["labels"] == ["0", "1"] and sum(map(sum, matrix["matrix"])) == 16
    correct = matrix["matrix"][0][0] + matrix["matrix"][1][1]
    assert correct / 16 == pytest.approx(series["eval.accuracy"]["y"][-1])
    fragment = client.get(f"/jobs/{job_id}/evaluation", headers={"Accept": "text/html"}).text
    assert 'data-testid="confusion-matrix"' in fragment

    # then: the TensorBoard event files download as a zip and hold the same scalars
    response = client.get(f"/api/v1/jobs/{job_id}/tensorboard")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    unzipped = tmp_path / "tb"
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(unzipped)
    scalars = _tensorboard_scalars(unzipped)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(series["train.loss"]["y"], rel=1e-6)
    assert [v for _, v in scalars["eval/accuracy"]] == pytest.approx(series["eval.accuracy"]["y"])

    # then: the MLflow store has a finished run with the job's metrics and parameters
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.get_experiment_by_name("peft-studio")
    assert experiment is not None
    (run,) = mlflow.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "lora" and run.data.params["training.max_steps"] == "4"
    history = mlflow.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(series["train.loss"]["y"])
    assert [m.value for m in mlflow.get_metric_history(run.info.run_id, "eval/f1_macro")] == pytest.approx(
        series["eval.f1_macro"]["y"]
    )


def test_tensorboard_download_without_tracking_is_a_clear_404(client: Any) -> None:
    from sqlmodel import Session

    from app.core.db import get_engine

    dataset_id = client.post("/api/v1/datasets", files={"file": ("d.csv", sst2_bytes(40))}).json()["id"]
    with Session(get_engine()) as session:
        job_id = create_job(session, dataset_id=dataset_id).id
    response = client.get(f"/api/v1/jobs/{job_id}/tensorboard")
    assert response.status_code == 404 and "tracking.tensorboard" in response.json()["detail"]
