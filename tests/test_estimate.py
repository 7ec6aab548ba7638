"""The pre-launch estimate: exact counts from a meta-device build, label count from the dataset profile,
a memory breakdown that follows the method, and clear 422s over the API. (That the counts equal what a real
job records is checked for every method in tests/test_methods.py.)"""

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.settings import BUNDLED_MODEL_ID
from app.core.spec import JobSpec
from app.core.tasks import CLASSIFICATION
from worker.methods import get_method

MINILM_PARAMS = 22_713_216  # the bundled MiniLM without a head: BERT body and pooler
CSV_2 = b"text,label\na fine film,1\na dull film,0\nlovely,1\nawful,0\nsplendid,1\ntedious,0\n"
CSV_3 = b"text,label\nfine,pos\ndull,neg\nso-so,mid\nlovely,pos\nawful,neg\nmeh,mid\n"


def upload(client: TestClient, content: bytes, filename: str) -> int:
    response = client.post("/api/v1/datasets", files={"file": (filename, content, "text/csv")})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def estimate(method: str, labels: int = 2, **config: Any) -> Any:
    from worker.estimate import estimate as run

    info = get_method(method)
    return run(
        BUNDLED_MODEL_ID,
        CLASSIFICATION,
        info,
        info.config.model_validate(config),
        num_labels=labels,
        batch_size=32,
        max_length=128,
        total_steps=100,
    )


def test_api_counts_come_from_the_method_and_the_profiles_label_count(client: TestClient) -> None:
    # given a two-class and a three-class dataset
    two = upload(client, CSV_2, "two.csv")
    three = upload(client, CSV_3, "three.csv")

    # when full fine-tuning is estimated on each, for one epoch (auto would pick more steps for so few rows)
    answers = [
        client.post(
            "/api/v1/jobs/estimate", json={"dataset_id": d, "method": "full", "training": {"num_epochs": 1}}
        ).json()
        for d in (two, three)
    ]

    # then every weight trains, and the head has 384 inputs per class plus a bias
    assert [a["num_labels"] for a in answers] == [2, 3]
    assert [a["total_params"] for a in answers] == [MINILM_PARAMS + 2 * 385, MINILM_PARAMS + 3 * 385]
    assert all(a["trainable_params"] == a["total_params"] and a["trainable_percent"] == 100 for a in answers)
    memory = answers[0]["memory"]
    parts = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes")
    assert memory["total_bytes"] == sum(memory[part] for part in parts)
    assert memory["weights_bytes"] == answers[0]["total_params"] * 4
    # 6 rows, 10% held out → 5 training rows: one step per epoch
    assert answers[0]["total_steps"] == 1


def test_api_lora_estimate_equals_the_direct_one(client: TestClient) -> None:
    dataset = upload(client, CSV_2, "two.csv")
    body = {"dataset_id": dataset, "method": "lora", "method_config": {"r": 4, "target_modules": ["query"]}}

    answer = client.post("/api/v1/jobs/estimate", json=body)

    assert answer.status_code == 200, answer.text
    direct = estimate("lora", r=4, target_modules=["query"])
    # LoRA on 6 query projections (A: 4×384, B: 384×4) plus the new head; peft keeps the original head next
    # to its trained copy (modules_to_save), so the total counts the head twice
    lora = 6 * 2 * 4 * 384
    assert answer.json()["trainable_params"] == direct.trainable_params == lora + 2 * 385
    assert answer.json()["total_params"] == direct.total_params == MINILM_PARAMS + 2 * 2 * 385 + lora


def test_api_reports_a_method_that_cannot_run_as_a_422(client: TestClient) -> None:
    dataset = upload(client, CSV_2, "two.csv")
    # AdaLoRA needs steps between its warm-up and final phase; this job has one step in all.
    body = {
        "dataset_id": dataset,
        "method": "adalora",
        "method_config": {"tinit": 5},
        "training": {"num_epochs": 1},
    }

    answer = client.post("/api/v1/jobs/estimate", json=body)

    assert answer.status_code == 422
    assert answer.json()["field"] == "method_config" and "tinit" in answer.json()["detail"]


def test_api_unknown_dataset_is_a_422(client: TestClient) -> None:
    answer = client.post("/api/v1/jobs/estimate", json={"dataset_id": 999, "method": "lora"})

    assert answer.status_code == 422 and answer.json()["field"] == "dataset_id"


def test_the_base_model_is_built_on_the_meta_device() -> None:
    from app.core.base_models import resolve_base_model
    from worker.estimate import meta_model

    model = meta_model(resolve_base_model(BUNDLED_MODEL_ID), CLASSIFICATION, 2)

    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_memory_follows_the_method() -> None:
    lora, qlora, qlora8 = estimate("lora"), estimate("qlora"), estimate("qlora", bits=8)
    frozen, full, checkpointed = (
        estimate("freeze", k=1),
        estimate("full"),
        estimate("qlora", gradient_checkpointing=True),
    )

    # 4-bit weights take a bit over an eighth of fp32 (embeddings and norms stay fp32); 8-bit about a quarter
    assert qlora.memory.weights_bytes < qlora8.memory.weights_bytes < lora.memory.weights_bytes
    assert qlora.trainable_params == lora.trainable_params and qlora.total_params == lora.total_params
    # full fine-tuning keeps Adam moments for every weight; one unfrozen layer keeps one layer's activations
    assert full.memory.optimizer_bytes == 2 * 4 * full.trainable_params
    assert frozen.memory.activations_bytes * 6 == full.memory.activations_bytes
    assert checkpointed.memory.activations_bytes < qlora.memory.activations_bytes / 3


@pytest.mark.parametrize(
    ("rows", "fraction", "batch", "epochs", "max_steps", "expected"),
    [
        (100, 0.1, 32, 1.0, None, 3),
        (100, 0.0, 32, 2.0, None, 8),
        (100, 0.1, 32, 1.0, 7, 7),
        (6920, 0.0, 32, 1.0, None, 217),
    ],
)
def test_planned_steps_match_the_trainer(
    rows: int, fraction: float, batch: int, epochs: float, max_steps: int | None, expected: int
) -> None:
    from worker.estimate import planned_steps, training_examples

    spec = JobSpec.model_validate(
        {
            "dataset_id": 1,
            "validation_fraction": fraction,
            "training": {"batch_size": batch, "num_epochs": epochs, "max_steps": max_steps},
        }
    )

    assert planned_steps(spec, training_examples(spec, {"rows": rows})) == expected


def test_the_fit_per_gpu_class_is_in_the_api_answer_and_the_forms_words(client: TestClient) -> None:
    from app.core.spec import GPU_CLASS_BYTES

    dataset = upload(client, CSV_2, "two.csv")
    # when the bundled MiniLM is estimated with LoRA
    body = {"dataset_id": dataset, "method": "lora", "training": {"num_epochs": 1}}
    answer = client.post("/api/v1/jobs/estimate", json=body).json()
    # then every GPU class the studio knows is answered, and the smallest holds it
    fit = answer["gpu_fit"]
    assert [c["gpu_class"] for c in fit["classes"]] == list(GPU_CLASS_BYTES)
    assert all(c["fits"] for c in fit["classes"])
    assert fit["peak_bytes"] > answer["memory"]["total_bytes"]
    assert fit["summary"] == "fits on a 16 GB GPU" and answer["suggested_gpu_class"] == "16gb"
    # and the form's Estimate button says it in words
    form = {"dataset_id": str(dataset), "method": "lora", "task": CLASSIFICATION, "num_epochs": "1"}
    page = client.post("/jobs/new/estimate", data=form)
    assert page.status_code == 200, page.text
    assert 'data-testid="estimate-fit"' in page.text and "fits on a 16 GB GPU" in page.text


def test_the_fit_in_words_for_a_large_and_a_too_large_model() -> None:
    from worker.estimate import gpu_fit

    # a 30 GB footprint: 30 × 1.2 + 2 = 38 GB → the 40 GB class is the smallest that holds it
    middle = gpu_fit(30 * 10**9)
    assert middle["summary"].startswith("needs 40 GB")
    assert {c["gpu_class"]: c["fits"] for c in middle["classes"]} == {
        "16gb": False,
        "24gb": False,
        "40gb": True,
        "48gb": True,
        "80gb": True,
        "141gb": True,
    }
    # beyond the largest class
    assert gpu_fit(200 * 10**9)["summary"].startswith("CPU only (no GPU class fits")
