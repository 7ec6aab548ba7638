"""Evaluating an adapter on a test file through the real worker code: metrics, predictions CSV, pages, owners.

The worker side runs in-process (``run_evaluation`` is what the Celery task calls), on the same database and
artifact store as the API, like tests/test_methods.py runs ``engine.run_job``.
"""

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.core.db import get_engine
from app.core.models import Adapter, AuditEvent, Evaluation, EvaluationStatus, Job, JobStatus, MetricPoint
from app.core.spec import JobSpec
from tests import lm
from tests.conftest import Account
from tests.factories import sst2_bytes
from tests.lm import MEMORISE, json_bytes
from worker.evaluation import run_evaluation

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module

TRAIN_ROWS = 17  # 16 trained (one batch), one held out
DEV_ROWS = 48


def upload(client: TestClient, account: Account, data: bytes, filename: str) -> int:
    """Upload a dataset as ``account``; its id."""
    response = client.post(
        "/api/v1/datasets", files={"file": (filename, data, "text/csv")}, headers=account.headers
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def train_classifier(client: TestClient, account: Account) -> int:
    """A LoRA classifier on 16 SST-2 rows, trained in-process as ``account``'s job; the adapter id."""
    from worker.engine import run_job

    dataset = upload(client, account, sst2_bytes(TRAIN_ROWS), "train.csv")
    spec = {
        "dataset_id": dataset,
        "validation_fraction": 1 / TRAIN_ROWS,
        "training": {
            "max_steps": 4,
            "batch_size": 16,
            "learning_rate": 5e-3,
            "max_length": 64,
            "logging_steps": 1,
            "eval_steps": 1000,
            "warmup_ratio": 0,
            "lr_scheduler": "constant",
        },
    }
    created = client.post("/api/v1/jobs", json=spec, headers=account.headers)
    assert created.status_code == 201, created.text
    run_job(created.json()["id"])
    with Session(get_engine()) as session:
        job = session.get(Job, created.json()["id"])
        assert job is not None and job.status == JobStatus.succeeded, job and job.error
        adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()
        assert adapter.owner_id == account.id
        return int(adapter.id or 0)


def fake_adapter(
    account: Account, labels: list[str], task: str = "sequence-classification", **spec_fields: Any
) -> int:
    """An adapter row (no files) owned by ``account``, for checks that never load it."""
    spec = JobSpec.model_validate({"dataset_id": 1, **spec_fields}).model_dump(mode="json")
    with Session(get_engine()) as session:
        job = Job(name="j", spec=spec, method="lora", base_model=spec["base_model"], dataset_id=None,
                  status=JobStatus.succeeded, owner_id=account.id)  # fmt: skip
        session.add(job)
        session.commit()
        assert job.id is not None
        adapter = Adapter(job_id=job.id, owner_id=account.id, name="a", method="lora", task=task,
                          base_model=spec["base_model"], storage_key=f"jobs/{job.id}/adapter", size_bytes=1,
                          trainable_params=1, total_params=2, labels=labels)  # fmt: skip
        session.add(adapter)
        session.commit()
        return int(adapter.id or 0)


def read_csv(content: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(content.decode("utf-8"))))


def evaluation_row(evaluation_id: int) -> Evaluation:
    with Session(get_engine()) as session:
        row = session.get(Evaluation, evaluation_id)
        assert row is not None
        return row


def test_a_labelled_test_file_gets_scikit_learn_metrics_and_an_unlabelled_one_predictions(
    client: TestClient, make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    from worker import inference

    monkeypatch.setattr(inference, "WARM", inference.WarmModels())  # ids restart in every test's database
    alice = make_user("alice")
    adapter = train_classifier(client, alice)
    # given a labelled SST-2 dev sample and the same sentences without labels, in a column of another name
    dev = sst2_bytes(DEV_ROWS, "dev.csv")
    labelled = upload(client, alice, dev, "dev.csv")
    sentences = [row["text"] for row in read_csv(dev)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["sentence"])
    writer.writerows([s] for s in sentences)
    unlabelled = upload(client, alice, buffer.getvalue().encode(), "unlabelled.csv")

    # when alice evaluates on the labelled file (columns default to the training ones) and the worker runs it
    created = client.post(
        f"/api/v1/adapters/{adapter}/evaluations", json={"dataset_id": labelled}, headers=alice.headers
    )
    assert created.status_code == 201, created.text
    evaluation = created.json()
    assert evaluation["status"] == "queued" and evaluation["settings"]["label_column"] == "label"
    run_evaluation(evaluation["id"])

    # then it succeeded, and its metrics are scikit-learn's on the predictions it stored
    result = client.get(f"/api/v1/evaluations/{evaluation['id']}", headers=alice.headers).json()
    assert result["status"] == "succeeded", result["error"]
    assert result["row_count"] == DEV_ROWS and result["has_predictions"]
    download = client.get(f"/api/v1/evaluations/{evaluation['id']}/predictions.csv", headers=alice.headers)
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/csv")
    rows = read_csv(download.content)
    assert [row["text"] for row in rows] == sentences
    truth = [row["label"] for row in rows]
    predicted = [row["predicted_label"] for row in rows]
    assert truth == [row["label"] for row in read_csv(dev)]
    labels = ["0", "1"]
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert result["metrics"]["f1_macro"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    per_class = result["details"]["per_class"]
    assert [c["label"] for c in per_class] == labels
    assert [c["precision"] for c in per_class] == pytest.approx(list(precision))
    assert [c["recall"] for c in per_class] == pytest.approx(list(recall))
    assert [c["f1"] for c in per_class] == pytest.approx(list(f1))
    assert [c["support"] for c in per_class] == list(support) and sum(support) == DEV_ROWS
    matrix = result["details"]["confusion_matrix"]
    assert matrix["matrix"] == confusion_matrix(truth, predicted, labels=labels).tolist()
    # and each row's probabilities are the try-out's for that sentence, their argmax the predicted label
    for row in rows:
        probabilities = [float(row[f"probability_{label}"]) for label in labels]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert labels[probabilities.index(max(probabilities))] == row["predicted_label"]
    tried = client.post(
        f"/api/v1/adapters/{adapter}/predict", json={"texts": sentences[:4]}, headers=alice.headers
    ).json()["predictions"]
    for row, prediction in zip(rows[:4], tried, strict=True):
        assert [float(row[f"probability_{label}"]) for label in labels] == pytest.approx(
            [prediction["probabilities"][label] for label in labels], abs=1e-4
        )

    # when she evaluates the unlabelled file, naming its text column
    created = client.post(
        f"/api/v1/adapters/{adapter}/evaluations",
        json={"dataset_id": unlabelled, "text_column": "sentence"},
        headers=alice.headers,
    )
    assert created.status_code == 201, created.text
    run_evaluation(created.json()["id"])
    batch = client.get(f"/api/v1/evaluations/{created.json()['id']}", headers=alice.headers).json()

    # then it gives predictions only: the same predictions, no scores
    assert batch["status"] == "succeeded", batch["error"]
    assert batch["settings"]["label_column"] is None
    assert "accuracy" not in batch["metrics"] and "per_class" not in batch["details"]
    assert sum(batch["details"]["predicted_counts"].values()) == DEV_ROWS
    csv_rows = read_csv(
        client.get(f"/api/v1/evaluations/{batch['id']}/predictions.csv", headers=alice.headers).content
    )
    assert "label" not in csv_rows[0]
    assert [row["predicted_label"] for row in csv_rows] == predicted

    # and both are listed on the adapter, newest first, with an audit trail of creating and downloading
    listed = client.get(f"/api/v1/adapters/{adapter}/evaluations", headers=alice.headers).json()
    assert [e["id"] for e in listed["data"]] == [batch["id"], evaluation["id"]] and listed["count"] == 2
    with Session(get_engine()) as session:
        audited = session.exec(select(AuditEvent).where(AuditEvent.object_type == "evaluation")).all()
    actions = sorted((event.action, event.object_id) for event in audited)
    assert ("create", evaluation["id"]) in actions and ("download", evaluation["id"]) in actions
    assert all(event.user_id == alice.id for event in audited)

    # and the pages show the metrics, the per-class table, the confusion matrix and the download link
    page = client.get(f"/evaluations/{evaluation['id']}", headers=alice.headers)
    assert page.status_code == 200
    for marker in ("evaluation-metrics", "evaluation-per-class", "confusion-matrix", "predictions.csv"):
        assert marker in page.text, marker
    fragment = client.get(f"/adapters/{adapter}/evaluations", headers=alice.headers)
    assert fragment.status_code == 200 and "evaluation-form" in fragment.text
    assert f'<option value="{labelled}">' in fragment.text
    assert (
        f"/adapters/{adapter}/evaluations" in client.get(f"/adapters/{adapter}", headers=alice.headers).text
    )


def test_bad_requests_are_refused_and_other_users_get_404(
    client: TestClient, make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    adapter = fake_adapter(alice, ["0", "1"])
    dataset = upload(client, alice, sst2_bytes(20, "dev.csv"), "dev.csv")
    url = f"/api/v1/adapters/{adapter}/evaluations"

    # a column the file does not have: 422 naming the column and the field
    response = client.post(
        url, json={"dataset_id": dataset, "text_column": "sentence"}, headers=alice.headers
    )
    assert response.status_code == 422
    assert response.json()["field"] == "text_column" and "'sentence'" in response.json()["detail"]
    response = client.post(url, json={"dataset_id": dataset, "label_column": "gold"}, headers=alice.headers)
    assert response.status_code == 422 and "'gold'" in response.json()["detail"]
    # the label column as the text column: numbers, not text
    response = client.post(url, json={"dataset_id": dataset, "text_column": "label"}, headers=alice.headers)
    assert response.status_code == 422 and response.json()["field"] == "text_column"

    # labels the adapter does not know are named
    other_labels = fake_adapter(alice, ["negative", "positive"])
    response = client.post(
        f"/api/v1/adapters/{other_labels}/evaluations", json={"dataset_id": dataset}, headers=alice.headers
    )
    assert response.status_code == 422
    assert "'0'" in response.json()["detail"] and "'1'" in response.json()["detail"]
    # ... unless the labels are left out: predictions only
    response = client.post(
        f"/api/v1/adapters/{other_labels}/evaluations",
        json={"dataset_id": dataset, "label_column": None},
        headers=alice.headers,
    )
    assert response.status_code == 201, response.text

    # an adapter trained on joined text columns reads the same columns by default
    joined = fake_adapter(alice, ["0", "1"], text_columns=["title", "body"])
    news = upload(client, alice, b"title,body,label\nA,x y,0\nB,z w,1\nC,v u,0\nD,t s,1\n", "news.csv")
    response = client.post(
        f"/api/v1/adapters/{joined}/evaluations", json={"dataset_id": news}, headers=alice.headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["settings"]["text_columns"] == ["title", "body"]
    assert response.json()["settings"]["label_column"] == "label"

    # the adapter page's form: a redirect to the new evaluation's page, or the error in the form (htmx)
    form = client.post(
        f"/adapters/{joined}/evaluations",
        data={"dataset_id": str(news), "text_column": "title, body", "predictions_only": "1"},
        headers=alice.headers,
        follow_redirects=False,
    )
    assert form.status_code == 303, form.text
    from_form = evaluation_row(int(form.headers["location"].rsplit("/", 1)[1]))
    assert (
        from_form.settings["text_columns"] == ["title", "body"] and from_form.settings["label_column"] is None
    )
    form = client.post(
        f"/adapters/{joined}/evaluations",
        data={"dataset_id": str(news), "text_column": "headline"},
        headers={**alice.headers, "HX-Request": "true"},
    )
    assert form.status_code == 422 and "&#39;headline&#39;" in form.text

    # bob: alice's adapter, her evaluation and its CSV are 404, as are her datasets on his adapter
    created = client.post(url, json={"dataset_id": dataset}, headers=alice.headers).json()
    calls: tuple[tuple[str, str, dict[str, Any]], ...] = (
        ("POST", url, {"json": {"dataset_id": dataset}}),
        ("GET", url, {}),
        ("GET", f"/api/v1/evaluations/{created['id']}", {}),
        ("GET", f"/api/v1/evaluations/{created['id']}/predictions.csv", {}),
        ("GET", f"/evaluations/{created['id']}", {}),
        ("GET", f"/adapters/{adapter}/evaluations", {}),
    )
    for method, path, kwargs in calls:
        response = client.request(method, path, headers=bob.headers, **kwargs)
        assert response.status_code == 404, f"{method} {path}: {response.status_code}"
    bobs_adapter = fake_adapter(bob, ["0", "1"])
    response = client.post(
        f"/api/v1/adapters/{bobs_adapter}/evaluations", json={"dataset_id": dataset}, headers=bob.headers
    )
    assert response.status_code == 404
    # the admin may evaluate alice's adapter: the evaluation is alice's, beside her adapter
    by_admin = client.post(url, json={"dataset_id": dataset})
    assert by_admin.status_code == 201
    assert evaluation_row(by_admin.json()["id"]).owner_id == alice.id
    # a queued evaluation has no predictions to download yet
    response = client.get(f"/api/v1/evaluations/{created['id']}/predictions.csv", headers=alice.headers)
    assert response.status_code == 404 and "no predictions yet" in response.json()["detail"]
    page = client.get(f"/evaluations/{created['id']}", headers=alice.headers).text
    assert "queued" in page and 'http-equiv="refresh"' in page  # refreshes until the worker is done


def test_a_dataset_deleted_before_the_worker_runs_fails_the_evaluation_with_a_reason(
    client: TestClient, make_user: Any
) -> None:
    alice = make_user("alice")
    adapter = fake_adapter(alice, ["0", "1"])
    dataset = upload(client, alice, sst2_bytes(20, "dev.csv"), "dev.csv")
    created = client.post(
        f"/api/v1/adapters/{adapter}/evaluations", json={"dataset_id": dataset}, headers=alice.headers
    ).json()
    assert client.delete(f"/api/v1/datasets/{dataset}", headers=alice.headers).status_code == 204

    with pytest.raises(Exception, match="deleted"):
        run_evaluation(created["id"])

    row = evaluation_row(created["id"])
    assert row.status == EvaluationStatus.failed and f"Dataset {dataset} was deleted" in (row.error or "")
    page = client.get(f"/evaluations/{created['id']}", headers=alice.headers).text
    assert "evaluation-error" in page and f"Dataset {dataset} was deleted" in page
    assert 'http-equiv="refresh"' not in page  # finished: the page stops refreshing
    run_evaluation(created["id"])  # a redelivered message for a finished evaluation changes nothing
    assert evaluation_row(created["id"]).status == EvaluationStatus.failed


def test_a_causal_lm_adapter_gets_the_training_loss_and_greedy_samples(
    client: TestClient, make_user: Any, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine import run_job

    # given a LoRA adapter trained on four Alpaca rows and evaluated on them at its last step
    alice = make_user("alice")
    dataset = upload(client, alice, json_bytes(MEMORISE), "memorise.json")
    spec = {
        "task": "causal-lm",
        "base_model": str(tiny_lm),
        "dataset_id": dataset,
        "validation_fraction": 0,
        "validation_dataset_id": dataset,
        "training": {
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "max_length": 64,
            "logging_steps": 1,
            "eval_steps": 4,
            "seed": 0,
        },  # fmt: skip
    }
    created = client.post("/api/v1/jobs", json=spec, headers=alice.headers)
    assert created.status_code == 201, created.text
    run_job(created.json()["id"])
    with Session(get_engine()) as session:
        adapter = session.exec(select(Adapter).where(Adapter.job_id == created.json()["id"])).one()
        points = session.exec(select(MetricPoint).where(MetricPoint.job_id == created.json()["id"])).all()
    trained_eval = [p.values for p in points if p.split == "eval" and "perplexity" in p.values][-1]

    # when the adapter is evaluated on the same file
    response = client.post(
        f"/api/v1/adapters/{adapter.id}/evaluations",
        json={"dataset_id": dataset, "samples": 2, "max_new_tokens": 8},
        headers=alice.headers,
    )
    assert response.status_code == 201, response.text
    run_evaluation(response.json()["id"])
    result = client.get(f"/api/v1/evaluations/{response.json()['id']}", headers=alice.headers).json()

    # then the loss is the training evaluation's (same formatting and masking), with greedy samples
    assert result["status"] == "succeeded", result["error"]
    metrics = result["metrics"]
    assert metrics["perplexity"] == pytest.approx(trained_eval["perplexity"], rel=1e-4)
    assert metrics["token_accuracy"] == pytest.approx(trained_eval["token_accuracy"], abs=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    samples = result["details"]["samples"]
    assert [s["row"] for s in samples] == [1, 2]
    assert samples[0]["reference"].strip() == MEMORISE[0]["output"]
    assert "France" in samples[0]["prompt"]
    rows = read_csv(
        client.get(f"/api/v1/evaluations/{result['id']}/predictions.csv", headers=alice.headers).content
    )
    assert len(rows) == len(MEMORISE) and all(float(row["loss"]) > 0 for row in rows)
    assert rows[0]["generated"] == samples[0]["generated"] and rows[3]["generated"] == ""
    page = client.get(f"/evaluations/{result['id']}", headers=alice.headers).text
    assert "evaluation-samples" in page and json.dumps(metrics) and "perplexity" in page

    # and the adapter page's form offers the format and its columns, the training ones chosen
    fragment = client.get(f"/adapters/{adapter.id}/evaluations", headers=alice.headers).text
    assert 'value="alpaca" selected' in fragment and 'name="causal_lm.prompt_column"' in fragment
    form = client.post(
        f"/adapters/{adapter.id}/evaluations",
        data={
            "dataset_id": str(dataset),
            "causal_lm.format": "prompt-completion",
            "causal_lm.prompt_column": "instruction",
            "causal_lm.completion_column": "output",
        },  # fmt: skip
        headers=alice.headers,
        follow_redirects=False,
    )
    assert form.status_code == 303, form.text
    queued = evaluation_row(int(form.headers["location"].rsplit("/", 1)[1]))
    assert queued.settings["causal_lm"]["format"] == "prompt-completion"
    assert queued.settings["causal_lm"]["prompt_column"] == "instruction"
    form = client.post(
        f"/adapters/{adapter.id}/evaluations",
        data={"dataset_id": str(dataset), "causal_lm.format": "chat"},
        headers={**alice.headers, "HX-Request": "true"},
    )
    assert form.status_code == 422 and "messages" in form.text


@pytest.mark.timeout(900)  # a real studio trains and evaluates on a loaded 2-core machine
def test_the_adapter_page_form_runs_an_evaluation_on_the_real_worker(
    tmp_path: Path, chromium_path: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.conftest import CHROMIUM_ARGS
    from tests.studio import run_studio, wait_for_job

    with run_studio(tmp_path / "data", PEFT_STUDIO_TORCH_THREADS="1") as studio, studio.client() as api:
        # given an adapter trained by the studio's worker, and a labelled dev sample uploaded beside it
        train = api.post(
            "/api/v1/datasets", files={"file": ("train.csv", sst2_bytes(TRAIN_ROWS), "text/csv")}
        )
        dev = api.post("/api/v1/datasets", files={"file": ("dev.csv", sst2_bytes(32, "dev.csv"), "text/csv")})
        assert train.status_code == dev.status_code == 201, (train.text, dev.text)
        spec = {
            "dataset_id": train.json()["id"],
            "validation_fraction": 1 / TRAIN_ROWS,
            "training": {"max_steps": 2, "batch_size": 16, "max_length": 64, "eval_steps": 1000},
        }
        job = api.post("/api/v1/jobs", json=spec)
        assert job.status_code == 201, job.text
        finished = wait_for_job(api, job.json()["id"], timeout=600)
        assert finished["status"] == "succeeded", finished
        adapter = finished["adapter_id"]

        playwright = sync_playwright().start()
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            # when the dev file is chosen in the adapter page's evaluation form (loaded by htmx) and submitted
            studio.open_page(page, f"/adapters/{adapter}")
            expect(page.get_by_test_id("evaluation-form")).to_be_visible()
            page.select_option("#evaluation-dataset", str(dev.json()["id"]))
            page.get_by_test_id("evaluation-submit").click()
            page.wait_for_url(re.compile(r"/evaluations/\d+$"))
            # then the worker runs it and the page (refreshing until done) shows the scores and the download
            expect(page.get_by_test_id("evaluation-status")).to_have_text("succeeded", timeout=300_000)
            expect(page.get_by_test_id("evaluation-metrics")).to_contain_text("accuracy")
            expect(page.get_by_test_id("confusion-matrix")).to_be_visible()
            expect(page.get_by_test_id("evaluation-download")).to_be_visible()
            evaluation_id = int(page.url.rsplit("/", 1)[1])
        finally:
            browser.close()
            playwright.stop()
        result = api.get(f"/api/v1/evaluations/{evaluation_id}").json()
        assert result["worker"] and result["row_count"] == 32
        rows = read_csv(api.get(f"/api/v1/evaluations/{evaluation_id}/predictions.csv").content)
        correct = sum(row["label"] == row["predicted_label"] for row in rows)
        assert result["metrics"]["accuracy"] == pytest.approx(correct / 32)


def test_batches_are_length_sorted_and_bounded_by_tokens_and_rows() -> None:
    from worker.evaluation import token_batches

    lengths = [5, 60, 3, 60, 12, 7, 64, 1] * 40
    batches = token_batches(lengths, budget=256, max_rows=16)

    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 16 and len(batch) * max(lengths[i] for i in batch) <= 256
    longest = [max(lengths[i] for i in batch) for batch in batches]
    assert longest == sorted(longest)
    assert token_batches([300, 2], budget=256) == [[1], [0]]  # a row longer than the budget goes alone
