"""Preference tuning (DPO, IPO, ORPO, SimPO, KTO): data shapes detected and refused clearly, every loss trained
through the engine on a tiny Llama, the rewards reported as metric points, the estimate, the OpenAI layer.

The studio runs in-process (the engine called directly, the API through a TestClient), on one database for the
module. Real data: /work/shared/data/preference (LLaMA-Factory's DPO and KTO demos), read in place.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import Session, col, select

from app.core.models import Adapter, Job, JobStatus, MetricPoint, Webhook
from tests import lm
from tests.conftest import ADMIN_TOKEN
from tests.factories import create_dataset, create_job
from tests.studio import SHARED_DATA

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module

PREFERENCE_DATA = SHARED_DATA / "preference"
# Short pairs a LoRA run separates in a few steps: the same batch seen again and again.
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I do not know, sorry."},
    {"prompt": "Name a primary color.", "chosen": "Blue.", "rejected": "Green is not one."},
    {"prompt": "Translate good morning to French.", "chosen": "Bonjour.", "rejected": "Good morning."},
    {"prompt": "Give a tip for staying healthy.", "chosen": "Drink water.", "rejected": "Eat more sugar."},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: as fast as two on a busy 2-core machine, and bit-for-bit repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Settings on a fresh, migrated data folder for the whole module."""
    from app.core.db import get_engine, run_migrations
    from app.core.queue import get_celery
    from app.core.settings import get_settings

    with pytest.MonkeyPatch.context() as patch:
        data_dir = tmp_path_factory.mktemp("preference") / "data"
        patch.setenv("PEFT_STUDIO_DATA_DIR", str(data_dir))
        patch.setenv("PEFT_STUDIO_ADMIN_TOKEN", ADMIN_TOKEN)
        for name in ("PEFT_STUDIO_DATABASE_URL", "PEFT_STUDIO_BROKER_URL", "PEFT_STUDIO_ARTIFACT_ROOT"):
            patch.delenv(name, raising=False)
        for cache in (get_settings, get_engine, get_celery):
            cache.cache_clear()
        run_migrations()
        yield data_dir
        get_engine().dispose()
        for cache in (get_settings, get_engine, get_celery):
            cache.cache_clear()


@pytest.fixture(scope="module")
def session(studio: Path) -> Iterator[Session]:
    from app.core.db import get_engine

    with Session(get_engine()) as db:
        yield db


@pytest.fixture(scope="module")
def api(studio: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as test_client:
        yield test_client


def dataset(session: Session, rows: list[dict[str, Any]], name: str = "pairs.json") -> int:
    return int(create_dataset(session, json.dumps(rows).encode(), name).id or 0)


@pytest.fixture(scope="module")
def pairs(session: Session) -> int:
    """The four short pairs, eight times over (32 rows: one batch of 32 is the whole set)."""
    return dataset(session, PAIRS * 8)


def preference_spec(base: Path, dataset_id: int, **fields: Any) -> dict[str, Any]:
    training = {
        "max_steps": 8,
        "batch_size": 8,
        "max_length": 64,
        "logging_steps": 1,
        "learning_rate": 5e-3,
        "warmup_ratio": 0,
        "eval_steps": 4,
        "save_steps": 0,
        **fields.pop("training", {}),
    }
    return {
        "task": "preference",
        "base_model": str(base),
        "dataset_id": dataset_id,
        "validation_fraction": 0.25,
        "method": "lora",
        "training": training,
        **fields,
    }


def run(session: Session, spec: dict[str, Any], owner_id: int | None = None) -> tuple[Job, Adapter]:
    """Run a job (of ``owner_id``) in-process; the finished job and its adapter."""
    from worker.engine import run_job

    job = create_job(session, **spec)
    if owner_id is not None:
        job.owner_id = owner_id
        session.add(job)
        session.commit()
    run_job(job.id)
    session.expire_all()
    finished = session.get(Job, job.id)
    assert finished is not None and finished.status == JobStatus.succeeded, finished and finished.error
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()
    return finished, adapter


def points(session: Session, job_id: int, split: str) -> list[dict[str, float]]:
    rows = session.exec(
        select(MetricPoint)
        .where(MetricPoint.job_id == job_id, MetricPoint.split == split)
        .order_by(col(MetricPoint.step))
    ).all()
    return [row.values for row in rows]


# ---- training: every loss through the engine --------------------------------------------------------


@pytest.mark.parametrize("loss", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_each_loss_trains_loss_falls_and_the_margin_rises(
    session: Session, tiny_lm: Path, pairs: int, loss: str
) -> None:
    # given the same 32 pairs every step; when a LoRA adapter trains with the loss
    job, adapter = run(session, preference_spec(tiny_lm, pairs, preference={"loss": loss}))
    # then the loss falls and (for pair losses) the reward margin rises; the rewards are metric points
    train = [p for p in points(session, job.id or 0, "train") if "loss" in p]
    assert train[-1]["loss"] < train[0]["loss"], [p["loss"] for p in train]
    if loss != "kto":
        assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
        for key in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ):
            assert key in train[-1], sorted(train[-1])
    else:
        assert "rewards/chosen" in train[-1] or "rewards/rejected" in train[-1], sorted(train[-1])
    evaluations = points(session, job.id or 0, "eval")
    assert evaluations and "loss" in evaluations[-1]
    if loss != "kto":
        assert "rewards/accuracies" in evaluations[-1] and "rewards/margins" in evaluations[-1]
    assert adapter.task == "preference"


# ---- data shapes: detected on upload, refused clearly when malformed ---------------------------------


_UPLOADED: dict[bytes, dict[str, Any]] = {}


def upload(api: Any, name: str, data: bytes) -> dict[str, Any]:
    """Upload a file through the API (once per content: the studio refuses the same file twice)."""
    if data not in _UPLOADED:
        response = api.post("/api/v1/datasets", files={"file": (name, data)})
        assert response.status_code == 201, response.text
        _UPLOADED[data] = response.json()
    return _UPLOADED[data]


def openai_rows(count: int) -> list[dict[str, Any]]:
    """OpenAI's preference JSONL rows made from the shared DPO demo (first user turn, first answers)."""
    demo = json.loads((PREFERENCE_DATA / "dpo_en_demo.json").read_text(encoding="utf-8"))[:count]
    return [
        {
            "input": {"messages": [{"role": "user", "content": row["conversations"][0]["value"]}]},
            "preferred_output": [{"role": "assistant", "content": row["chosen"]["value"]}],
            "non_preferred_output": [{"role": "assistant", "content": row["rejected"]["value"]}],
        }
        for row in demo
    ]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(row) for row in rows).encode()


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        (
            "dpo_en_demo.json",
            (PREFERENCE_DATA / "dpo_en_demo.json").read_bytes(),
            {"format": "pairs", "prompt_column": "conversations", "chosen_column": "chosen"},
        ),
        (
            "kto_en_demo.json",
            (PREFERENCE_DATA / "kto_en_demo.json").read_bytes(),
            {"format": "kto", "loss": "kto", "messages_column": "messages", "label_column": "label"},
        ),
        (
            "pairs.json",
            json.dumps(PAIRS).encode(),
            {"format": "pairs", "prompt_column": "prompt", "rejected_column": "rejected"},
        ),
        (
            "message-lists.json",
            json.dumps(
                [
                    {
                        "prompt": [{"role": "user", "content": p["prompt"]}],
                        "chosen": [{"role": "assistant", "content": p["chosen"]}],
                        "rejected": [{"role": "assistant", "content": p["rejected"]}],
                    }
                    for p in PAIRS
                ]
            ).encode(),
            {"format": "pairs", "prompt_column": "prompt"},
        ),
        (
            "openai.jsonl",
            jsonl(openai_rows(4)),
            {
                "prompt_column": "input",
                "chosen_column": "preferred_output",
                "rejected_column": "non_preferred_output",
            },
        ),
    ],
)
def test_each_data_shape_is_detected(api: Any, name: str, data: bytes, expected: dict[str, Any]) -> None:
    proposal = upload(api, name, data)["profile"]["proposal"]
    assert proposal["task"] == "preference", proposal
    assert expected.items() <= proposal["preference"].items(), proposal


def test_the_job_form_preselects_the_detected_preference_columns(api: Any) -> None:
    dataset_id = upload(api, "kto.json", (PREFERENCE_DATA / "kto_en_demo.json").read_bytes())["id"]
    page = api.get(f"/jobs/new?dataset_id={dataset_id}")
    assert page.status_code == 200
    assert 'value="preference" selected' in page.text
    # choosing the dataset in the form swaps in its proposal: the KTO columns and loss
    swapped = api.get(f"/jobs/new/columns?dataset_id={dataset_id}")
    assert swapped.status_code == 200, swapped.text
    assert 'id="f-preference-label-column"' in swapped.text and 'value="kto" selected' in swapped.text


BAD_ROW = 3


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"chosen": "Paris."}, "preference.chosen_column", f"row {BAD_ROW}: the chosen answer"),
        ({"rejected": ""}, "preference.rejected_column", f"row {BAD_ROW}: column 'rejected'"),
        (
            {"chosen": {"from": "human", "value": "hi"}},
            "preference.chosen_column",
            "must end with an assistant",
        ),
    ],
)
def test_malformed_pairs_are_refused_naming_the_row(
    api: Any, tiny_lm: Path, change: dict[str, Any], field: str, words: str
) -> None:
    rows = [dict(PAIRS[0], rejected=f"Not sure {i}.") for i in range(6)]
    rows[BAD_ROW - 1] = {**rows[BAD_ROW - 1], "rejected": "Paris.", **change}
    if "rejected" in change:
        rows[BAD_ROW - 1]["rejected"] = change["rejected"]
    dataset_id = upload(api, "bad-pairs.json", json.dumps(rows).encode())["id"]

    response = api.post("/api/v1/jobs", json=preference_spec(tiny_lm, dataset_id))

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == field and words in body["detail"], body
    assert body["row"] == BAD_ROW


def test_missing_columns_are_refused_with_a_hint(api: Any, tiny_lm: Path) -> None:
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejectd": p["rejected"]} for p in PAIRS]
    dataset_id = upload(api, "typo.json", json.dumps(rows).encode())["id"]

    response = api.post("/api/v1/jobs", json=preference_spec(tiny_lm, dataset_id))

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "preference.rejected_column"
    assert "'rejected'" in body["detail"] and "Did you mean 'rejectd'?" in body["detail"]


def test_a_kto_label_that_is_not_a_boolean_is_refused_naming_the_row(api: Any, tiny_lm: Path) -> None:
    demo = json.loads((PREFERENCE_DATA / "kto_en_demo.json").read_text(encoding="utf-8"))[:8]
    demo[4]["label"] = "maybe"
    dataset = upload(api, "kto-bad.json", json.dumps(demo).encode())
    assert dataset["profile"]["proposal"]["preference"]["format"] == "kto"  # still detected

    spec = preference_spec(tiny_lm, dataset["id"], preference={"format": "kto", "loss": "kto"})
    response = api.post("/api/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["row"] == 5 and body["field"] == "preference.label_column"
    assert "must be true or false" in body["detail"] and "'maybe'" in body["detail"]


def test_pair_losses_refuse_kto_data(api: Any, tiny_lm: Path) -> None:
    dataset_id = upload(api, "kto.json", (PREFERENCE_DATA / "kto_en_demo.json").read_bytes())["id"]
    spec = preference_spec(tiny_lm, dataset_id, preference={"format": "kto", "loss": "dpo"})
    response = api.post("/api/v1/jobs", json=spec)
    assert response.status_code == 422 and response.json()["field"] == "preference.loss"


# ---- preview and estimate ----------------------------------------------------------------------------


def test_preview_shows_prompt_masked_and_both_answers_with_truncation(api: Any, tiny_lm: Path) -> None:
    dataset_id = upload(api, "dpo.json", (PREFERENCE_DATA / "dpo_en_demo.json").read_bytes())["id"]
    spec = preference_spec(
        tiny_lm,
        dataset_id,
        preference={"prompt_column": "conversations"},
        training={"max_length": 96},
    )
    response = api.post("/api/v1/jobs/preview?count=4", json=spec)
    assert response.status_code == 200, response.text
    preview = response.json()
    assert preview["task"] == "preference" and preview["template"] == "tokenizer"
    example = preview["examples"][0]
    # the ChatML template of the tiny model is applied: the prompt ends with the assistant's turn opening
    assert example["prompt"].rstrip().endswith("<|im_start|>assistant")
    assert example["spans"][0]["masked"] is True
    assert example["chosen"]["text"] != example["rejected"]["text"]
    assert example["chosen"]["text"].endswith("<|im_end|>") or example["chosen"]["truncated"]
    assert any(e["chosen"]["truncated"] or e["rejected"]["truncated"] for e in preview["examples"])
    page = api.post(
        "/jobs/preview",
        data={
            "task": "preference",
            "base_model": str(tiny_lm),
            "dataset_id": str(dataset_id),
            "preference.prompt_column": "conversations",
            "training.max_length": "96",
            "method": "lora",
        },
    )
    assert page.status_code == 200, page.text
    assert 'data-testid="preview-chosen"' in page.text and 'data-testid="preview-rejected"' in page.text


def test_estimate_counts_two_sequences_and_the_reference_copy(api: Any, tiny_lm: Path, pairs: int) -> None:
    def estimate(**fields: Any) -> dict[str, Any]:
        response = api.post("/api/v1/jobs/estimate", json=fields)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    causal = estimate(
        task="causal-lm",
        base_model=str(tiny_lm),
        dataset_id=pairs,
        causal_lm={"format": "prompt-completion", "completion_column": "chosen"},
        training={"batch_size": 8, "max_length": 64},
    )
    lora = estimate(**preference_spec(tiny_lm, pairs))
    full = estimate(**preference_spec(tiny_lm, pairs, method="full"))
    orpo_full = estimate(**preference_spec(tiny_lm, pairs, method="full", preference={"loss": "orpo"}))
    assert lora["memory"]["activations_bytes"] == 2 * causal["memory"]["activations_bytes"]
    assert (
        lora["memory"]["weights_bytes"] == causal["memory"]["weights_bytes"]
    )  # no second copy with an adapter
    assert any("two sequences per example" in line for line in lora["assumptions"])
    # full fine-tuning loads a frozen reference: the base weights twice; ORPO needs no reference
    assert full["memory"]["weights_bytes"] == 2 * orpo_full["memory"]["weights_bytes"]
    assert any("frozen reference copy" in line for line in full["assumptions"])
    # KTO on pairs trains on each answer alone: twice the examples, twice the steps of an epoch
    epoch = {"max_steps": None, "num_epochs": 1}
    dpo_epoch = estimate(**preference_spec(tiny_lm, pairs, training=epoch))
    kto_epoch = estimate(**preference_spec(tiny_lm, pairs, training=epoch, preference={"loss": "kto"}))
    assert dpo_epoch["total_steps"] == 3 and kto_epoch["total_steps"] == 6  # 24 training pairs, batch 8


# ---- reference model: full fine-tuning loads a frozen copy; a job may continue a supervised adapter ------


def events(session: Session, job_id: int) -> list[str]:
    from app.core.models import JobEvent

    return [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == job_id)).all()]


def test_full_fine_tuning_loads_a_frozen_reference_and_says_what_it_costs(
    session: Session, tiny_lm: Path, pairs: int
) -> None:
    job, adapter = run(
        session,
        preference_spec(tiny_lm, pairs, method="full", training={"max_steps": 4, "learning_rate": 1e-3}),
    )
    train = [p for p in points(session, job.id or 0, "train") if "loss" in p]
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    assert any(
        "reference model a frozen copy of the base model" in m and "MB more memory" in m
        for m in events(session, job.id or 0)
    )


def test_a_job_continues_a_supervised_adapter_which_is_its_reference_and_try_out_starting_point(
    api: Any, session: Session, tiny_lm: Path, pairs: int
) -> None:
    from app.core.storage import get_store

    # given a supervised (causal-LM) LoRA adapter trained on the chosen answers
    sft_job = create_job(
        session,
        task="causal-lm",
        base_model=str(tiny_lm),
        dataset_id=pairs,
        validation_fraction=0.0,
        causal_lm={"format": "prompt-completion", "completion_column": "chosen"},
        training={"max_steps": 2, "batch_size": 8, "max_length": 64, "save_steps": 0},
    )
    from worker.engine import run_job

    run_job(sft_job.id)
    session.expire_all()
    sft = session.exec(select(Adapter).where(Adapter.job_id == sft_job.id)).one()
    # when a DPO job continues it
    job, adapter = run(
        session, preference_spec(tiny_lm, pairs, preference={"continue_from_adapter_id": sft.id})
    )
    # then the reference is the supervised adapter (trl's copy of its starting weights), not saved with the result
    assert any(f"reference model supervised adapter {sft.id}" in m for m in events(session, job.id or 0))
    folder = get_store().local_dir(adapter.storage_key)
    assert (folder / "adapter_model.safetensors").exists() and not (folder / "ref").exists()
    train = [p for p in points(session, job.id or 0, "train") if "loss" in p]
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    # and try-out chats with the aligned adapter beside the supervised one it started from
    page = api.get(f"/adapters/{adapter.id}/chat")
    assert page.status_code == 200, page.text
    assert f"Starting point: supervised adapter {sft.id}" in page.text
    assert f'data-base-model="ft:{tiny_lm.name}:ftjob-{sft_job.id}"' in page.text
    adapter_page = api.get(f"/adapters/{adapter.id}").text
    assert 'data-testid="chat-link"' in adapter_page and 'data-testid="merged-download"' in adapter_page
    assert "<dt>Labels</dt>" not in adapter_page  # a classifier's; a preference adapter has none

    # and its evaluation on the job's held-out pairs scores them against the supervised adapter, as training did
    from worker.evaluation import run_evaluation
    from worker.recipes.preference_data import held_out

    rows = PAIRS * 8
    split = sorted(held_out(len(rows), job.spec["validation_fraction"], job.spec["training"]["seed"]))
    held = dataset(session, [rows[i] for i in split], "continued-held-out.json")
    response = api.post(f"/api/v1/adapters/{adapter.id}/evaluations", json={"dataset_id": held})
    assert response.status_code == 201 and response.json()["settings"]["reference_adapter_id"] == sft.id
    run_evaluation(response.json()["id"])
    result = api.get(f"/api/v1/evaluations/{response.json()['id']}").json()
    assert result["status"] == "succeeded", result["error"]
    assert result["details"]["reference"] == "the supervised adapter the job started from"
    kept = min(points(session, job.id or 0, "eval"), key=lambda p: p["loss"])  # the best evaluation is kept
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "loss"):
        assert result["metrics"][key] == pytest.approx(kept[key], rel=1e-3, abs=1e-4), (key, kept)


def test_continuing_needs_the_same_base_and_method(
    api: Any, session: Session, tiny_lm: Path, pairs: int
) -> None:
    adapter = session.exec(select(Adapter).where(Adapter.task == "preference")).first()
    assert adapter is not None
    spec = preference_spec(tiny_lm, pairs, method="ia3", preference={"continue_from_adapter_id": adapter.id})
    response = api.post("/api/v1/jobs", json=spec)
    assert response.status_code == 422 and response.json()["field"] == "method", response.text
    spec = preference_spec(tiny_lm, pairs, preference={"continue_from_adapter_id": 9999})
    response = api.post("/api/v1/jobs", json=spec)
    assert response.status_code == 422 and "does not exist" in response.json()["detail"]


# ---- every method that makes an adapter (and the others, with a reference copy) -----------------------


# One of each kind (every method's build is the same code as for causal LM, tests/test_methods.py): a 4-bit base,
# DoRA, scaling vectors, virtual tokens, prefix key/values, the studio's own adapter (not peft: a reference copy),
# layer-wise rates (a full-weight method). LoRA and full fine-tuning are trained above.
METHODS = [
    ("qlora", {}),
    ("lora", {"use_dora": True}),
    ("ia3", {}),
    ("prompt", {}),
    ("prefix", {}),
    ("houlsby", {}),
    ("llrd", {}),
]


@pytest.mark.parametrize(("method", "config"), METHODS)
def test_dpo_trains_with_each_kind_of_method(
    session: Session, tiny_lm: Path, pairs: int, method: str, config: dict[str, Any]
) -> None:
    job, adapter = run(
        session,
        preference_spec(
            tiny_lm,
            pairs,
            method=method,
            method_config=config,
            validation_fraction=0.0,
            training={"max_steps": 2, "eval_steps": None},
        ),
    )
    train = [p for p in points(session, job.id or 0, "train") if "rewards/margins" in p]
    assert train and all(abs(p["loss"]) < 1e6 for p in train)
    assert adapter.method == method and adapter.trainable_params > 0


def test_adalora_is_not_offered_for_preference_tuning(api: Any, tiny_lm: Path, pairs: int) -> None:
    response = api.post("/api/v1/jobs", json=preference_spec(tiny_lm, pairs, method="adalora"))
    assert response.status_code == 422 and "does not support task 'preference'" in response.text


# ---- checkpoints and resume after a crash, as for every task -------------------------------------------


def test_a_crashed_dpo_job_resumes_from_its_checkpoint_and_ends_as_the_uninterrupted_run(
    session: Session, tiny_lm: Path, pairs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from app.core.storage import get_store
    from app.services.jobs import resume_job
    from worker import training
    from worker.engine import run_job

    class Crash(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                raise RuntimeError("simulated crash at step 3")

    fields = {"validation_fraction": 0.0, "training": {"max_steps": 4, "save_steps": 2, "eval_steps": None}}
    _, reference = run(session, preference_spec(tiny_lm, pairs, **fields))
    job = create_job(session, **preference_spec(tiny_lm, pairs, **fields))
    real = training.build_trainable
    with monkeypatch.context() as patch:
        patch.setattr(training, "build_trainable", lambda spec, *rest: (*real(spec, *rest)[:4], [Crash()]))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_job(job.id)
    session.expire_all()
    resumed = resume_job(session, job.id or 0)
    run_job(job.id, run_token=resumed.run_token)
    session.expire_all()
    done = session.get(Job, job.id)
    assert done is not None and done.status == JobStatus.succeeded, done and done.error
    assert any("resuming from the checkpoint at step 2" in m for m in events(session, job.id or 0))
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()

    def tensors(row: Adapter) -> dict[str, torch.Tensor]:
        return load_file(str(get_store().local_dir(row.storage_key) / "adapter_model.safetensors"))

    expected, actual = tensors(reference), tensors(adapter)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cancelling_a_running_dpo_job_stops_it_and_keeps_no_adapter(
    session: Session, tiny_lm: Path, pairs: int
) -> None:
    import threading
    import time

    from app.services.jobs import cancel_job
    from worker.engine import run_job

    # given a long DPO job that has started logging
    fields = {"validation_fraction": 0.0, "training": {"max_steps": 10_000, "eval_steps": None}}
    job = create_job(session, **preference_spec(tiny_lm, pairs, **fields))
    runner = threading.Thread(target=run_job, args=(job.id,))
    runner.start()
    deadline = time.monotonic() + 240
    while not session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id)).first():
        assert time.monotonic() < deadline and runner.is_alive(), "the job never logged a step"
        time.sleep(0.2)

    # when it is cancelled
    cancel_job(session, job.id or 0)
    runner.join(timeout=120)

    # then training stopped long before its 10,000 steps, the job is cancelled and no adapter was registered
    assert not runner.is_alive()
    session.expire_all()
    cancelled = session.get(Job, job.id)
    assert cancelled is not None and cancelled.status == JobStatus.cancelled, cancelled and cancelled.error
    assert (
        max(point.step for point in session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id)))
        < 10_000
    )
    assert session.exec(select(Adapter).where(Adapter.job_id == job.id)).first() is None


# ---- sweeps and compare, as for every task ---------------------------------------------------------------


def test_a_sweep_over_beta_and_compare_by_reward_accuracy(
    session: Session, tiny_lm: Path, pairs: int, api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (pairs before api: the order the module's earlier tests make them in; sweeps check the datasets' owner)
    sent: list[int] = []
    monkeypatch.setattr("app.core.queue.enqueue_training", lambda job_id, *a, **k: sent.append(job_id) or "t")
    # a sweep over the loss's beta queues one job per value (the queue is not under test here)
    request = {"base": preference_spec(tiny_lm, pairs), "grid": {"preference.beta": [0.05, 0.5]}}
    response = api.post("/api/v1/sweeps", json=request)
    assert response.status_code == 201, response.text
    assert sorted(j["spec"]["preference"]["beta"] for j in response.json()["jobs"]) == [0.05, 0.5]
    assert len(sent) == 2
    # ... and over the loss, each job checked as a preference job (a pair loss on KTO data would be refused)
    request = {"base": preference_spec(tiny_lm, pairs), "grid": {"preference.loss": ["dpo", "orpo", "kto"]}}
    response = api.post("/api/v1/sweeps", json=request)
    assert response.status_code == 201, response.text
    assert sorted(j["spec"]["preference"]["loss"] for j in response.json()["jobs"]) == ["dpo", "kto", "orpo"]
    request = {"base": preference_spec(tiny_lm, pairs), "grid": {"preference.loss": ["dpo", "sft"]}}
    response = api.post("/api/v1/sweeps", json=request)
    assert response.status_code == 422 and "preference.loss" in response.json()["detail"], response.text
    # the sweep form offers the preference task with betas and losses to try
    form = {
        "dataset_id": str(pairs),
        "task": "preference",
        "base_model": str(tiny_lm),
        "methods": ["lora"],
        "learning_rates": "5e-4",
        "ranks": "8",
        "betas": "0.05, 0.2",
        "losses": "dpo, ipo",
        "max_steps": "4",
        "max_length": "64",
        "extra": '{"training": {"batch_size": 8}, "validation_fraction": 0.25}',
    }
    assert 'name="betas"' in api.get("/sweeps/new").text
    created = api.post("/sweeps/new", data=form, follow_redirects=False)
    assert created.status_code == 303, created.text
    jobs = api.get(f"/api/v1/sweeps/{created.headers['location'].rsplit('/', 1)[1]}").json()["jobs"]
    combos = {(j["spec"]["preference"]["loss"], j["spec"]["preference"]["beta"]) for j in jobs}
    assert combos == {("dpo", 0.05), ("dpo", 0.2), ("ipo", 0.05), ("ipo", 0.2)}
    assert {j["spec"]["task"] for j in jobs} == {"preference"} and len(sent) == 2 + 3 + 4
    bad = api.post("/sweeps/new", data={**form, "betas": "high"})
    assert bad.status_code == 422 and "betas" in bad.text
    # two finished DPO jobs compare by their reward accuracy, the task's primary metric
    finished = session.exec(select(Job).where(Job.status == JobStatus.succeeded)).all()
    ids = [
        j.id for j in finished if j.spec.get("task") == "preference" and j.spec.get("validation_fraction")
    ][:2]
    compared = api.get("/api/v1/compare", params={"jobs": ",".join(map(str, ids))})
    assert compared.status_code == 200, compared.text
    rows = compared.json()["summary"]
    assert [row["metric"] for row in rows] == ["rewards/accuracies"] * 2
    assert all(row["best_metric"] is not None for row in rows)


def test_auto_learning_rate_is_a_tenth_of_the_supervised_one() -> None:
    from app.core.autoconfig import RuleInputs, resolve_training
    from app.core.spec import TrainingSettings

    def rate(task: str) -> float:
        inputs = RuleInputs(task, "lora", 5e-4, 1_000_000, 100, 10, 8)
        resolution = resolve_training(TrainingSettings(), inputs)
        assert "learning_rate" in resolution.chosen
        return float(resolution.training.learning_rate)

    assert rate("preference") == pytest.approx(rate("causal-lm") / 10)


# ---- evaluation: held-out reward accuracy and margin, on the real worker path ---------------------------------


def kto_rows(pairs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Pairs as KTO data: each chosen answer marked good, each rejected one bad."""
    return [
        {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p[answer]},
            ],
            "label": answer == "chosen",
        }
        for p in pairs
        for answer in ("chosen", "rejected")
    ]


@pytest.fixture(scope="module")
def held_out(session: Session) -> int:
    """Eight held-out pairs (the four, last first, twice)."""
    return dataset(session, list(reversed(PAIRS)) * 2, "held-out.json")


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A loopback webhook receiver the admin allow-lists (tests/webhook_receiver.py)."""
    from app.core.settings import get_settings
    from tests.webhook_receiver import webhook_receiver

    monkeypatch.setenv("PEFT_STUDIO_OUTBOUND_ALLOWED_HOSTS", "127.0.0.1")
    get_settings.cache_clear()
    with webhook_receiver() as running:
        yield running
    monkeypatch.undo()
    get_settings.cache_clear()


def test_a_dpo_job_fires_its_webhook_and_its_adapter_evaluates_on_held_out_pairs_as_training_scored_them(
    api: Any, session: Session, tiny_lm: Path, pairs: int, held_out: int, receiver: Any
) -> None:
    import csv
    import io

    from app.services.webhooks import dispatch_once
    from worker.evaluation import run_evaluation

    hook = api.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["job.succeeded"]})
    assert hook.status_code == 201, hook.text
    webhook = session.get(Webhook, hook.json()["id"])
    assert webhook is not None
    # given a DPO adapter whose training evaluated it on a held-out file at its last step
    job, adapter = run(
        session,
        preference_spec(
            tiny_lm,
            pairs,
            validation_fraction=0.0,
            validation_dataset_id=held_out,
            preference={"beta": 0.2},
            training={"max_steps": 4, "eval_steps": 4},
        ),
        owner_id=webhook.owner_id,  # a job of the webhook's owner
    )
    trained = points(session, job.id or 0, "eval")[-1]
    # the job's webhook fired as for any task: job.succeeded, with its task, spec, adapter and reward metrics
    dispatch_once()
    request = receiver.wait_for(lambda r: json.loads(r.body)["data"]["job"]["id"] == job.id)
    event = json.loads(request.body)
    assert event["type"] == "job.succeeded" and request.headers["x-peftstudio-event"] == "job.succeeded"
    assert event["data"]["job"]["spec"]["task"] == "preference"
    assert event["data"]["job"]["spec"]["preference"]["beta"] == 0.2
    assert event["data"]["adapter_id"] == adapter.id and "rewards/accuracies" in event["data"]["metrics"]
    assert api.delete(f"/api/v1/webhooks/{hook.json()['id']}").status_code == 204

    # when the adapter is evaluated on that file, through the API and the worker's evaluation
    response = api.post(f"/api/v1/adapters/{adapter.id}/evaluations", json={"dataset_id": held_out})
    assert response.status_code == 201, response.text
    assert response.json()["settings"]["beta"] == 0.2  # the job's beta
    assert response.json()["settings"]["preference"]["chosen_column"] == "chosen"  # as detected on upload
    run_evaluation(response.json()["id"])
    result = api.get(f"/api/v1/evaluations/{response.json()['id']}").json()

    # then it reports what trl reported for the same rows in training: rewards, accuracy, margin, DPO's loss
    assert result["status"] == "succeeded", result["error"]
    metrics = result["metrics"]
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "loss"):
        assert metrics[key] == pytest.approx(trained[key], rel=1e-3, abs=1e-4), (key, metrics, trained)
    assert metrics["rewards/margins"] > 0 and metrics["examples"] == 8
    assert result["details"]["reference"] == "the base model (adapter switched off)"
    rows = list(
        csv.DictReader(io.StringIO(api.get(f"/api/v1/evaluations/{result['id']}/predictions.csv").text))
    )
    assert len(rows) == 8 and rows[0]["chosen"].startswith(PAIRS[-1]["chosen"])
    for row in rows:
        margin = float(row["reward_chosen"]) - float(row["reward_rejected"])
        assert float(row["margin"]) == pytest.approx(margin, abs=1e-5)
        assert float(row["reward_chosen"]) == pytest.approx(
            0.2 * (float(row["logp_chosen"]) - float(row["ref_logp_chosen"])), abs=1e-3
        )
        assert row["correct"] == str(int(margin > 0))
    page = api.get(f"/evaluations/{result['id']}").text
    assert "rewards/accuracies" in page and 'data-testid="evaluation-rewards-note"' in page

    # and KTO data of the same answers: each answer's reward, its sign against its label
    kto = dataset(session, kto_rows(list(reversed(PAIRS)) * 2), "held-out-kto.json")
    response = api.post(f"/api/v1/adapters/{adapter.id}/evaluations", json={"dataset_id": kto})
    assert response.status_code == 201, response.text
    assert response.json()["settings"]["preference"]["format"] == "kto"
    run_evaluation(response.json()["id"])
    by_label = api.get(f"/api/v1/evaluations/{response.json()['id']}").json()
    assert by_label["status"] == "succeeded", by_label["error"]
    assert by_label["metrics"]["rewards/chosen"] == pytest.approx(metrics["rewards/chosen"], abs=1e-4)
    assert by_label["metrics"]["rewards/rejected"] == pytest.approx(metrics["rewards/rejected"], abs=1e-4)
    assert "loss" not in by_label["metrics"] and by_label["metrics"]["desirable_examples"] == 8

    # and the adapter page's form queues one with the detected format (no text or format fields to fill)
    fragment = api.get(f"/adapters/{adapter.id}/evaluations").text
    assert 'name="text_column"' not in fragment and 'name="causal_lm.format"' not in fragment
    form = api.post(
        f"/adapters/{adapter.id}/evaluations", data={"dataset_id": str(held_out)}, follow_redirects=False
    )
    assert form.status_code == 303, form.text


def test_evaluating_a_preference_adapter_on_other_data_is_refused_clearly(
    api: Any, session: Session, tiny_lm: Path
) -> None:
    adapter = session.exec(select(Adapter).where(Adapter.task == "preference")).first()
    assert adapter is not None
    url = f"/api/v1/adapters/{adapter.id}/evaluations"
    # a classification file is not preference data: 422 on the dataset, naming its columns
    labelled = dataset(
        session, [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}], "sst.json"
    )
    response = api.post(url, json={"dataset_id": labelled})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "dataset_id" and "not preference data" in response.json()["detail"]
    assert "'text'" in response.json()["detail"]
    # columns named that the file lacks: the same message as a preference job's
    response = api.post(url, json={"dataset_id": labelled, "preference": {"prompt_column": "text"}})
    assert response.status_code == 422 and response.json()["field"] == "preference.chosen_column", (
        response.text
    )
    # a malformed row of preference data is named, as for training
    same = dataset(session, [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}], "same.json")
    response = api.post(url, json={"dataset_id": same})
    assert response.status_code == 422 and f"Dataset {same}, row 1" in response.json()["detail"], (
        response.text
    )


@pytest.mark.parametrize(
    ("method", "reference", "tolerance"),
    [
        (
            "prompt",
            "the base model (adapter switched off)",
            1e-3,
        ),  # virtual tokens: trl keeps the real positions
        ("prefix", "the base model (adapter switched off)", 1e-3),  # prefix key/values
        # a 4-bit base: the reloaded quantized forward is not bit-for-bit training's (prepared for k-bit training)
        ("qlora", "the base model (adapter switched off)", 2e-2),
        (
            "houlsby",
            "a frozen copy of the base model",
            1e-3,
        ),  # the studio's own adapter changes the base model
        ("full", "a frozen copy of the base model", 1e-3),
    ],
)
def test_each_kind_of_reference_is_evaluated_as_training_scored_it(
    api: Any,
    session: Session,
    tiny_lm: Path,
    pairs: int,
    held_out: int,
    method: str,
    reference: str,
    tolerance: float,
) -> None:
    from worker.evaluation import run_evaluation

    job, adapter = run(
        session,
        preference_spec(
            tiny_lm,
            pairs,
            method=method,
            validation_fraction=0.0,
            validation_dataset_id=held_out,
            training={"max_steps": 2, "eval_steps": 2, "learning_rate": 1e-3},
        ),
    )
    trained = points(session, job.id or 0, "eval")[-1]
    response = api.post(f"/api/v1/adapters/{adapter.id}/evaluations", json={"dataset_id": held_out})
    assert response.status_code == 201, response.text
    run_evaluation(response.json()["id"])
    result = api.get(f"/api/v1/evaluations/{response.json()['id']}").json()
    assert result["status"] == "succeeded", result["error"]
    assert result["details"]["reference"] == reference
    assert result["metrics"]["rewards/margins"] != 0  # the reference is not the trained model
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected", "loss"):
        assert result["metrics"][key] == pytest.approx(trained[key], rel=tolerance, abs=1e-4), (key, trained)


def test_a_job_says_what_max_length_skipped_and_cut(session: Session, tiny_lm: Path) -> None:
    # given pairs of which four have a prompt longer than max length and four an answer that runs past it
    long_prompt = {**PAIRS[0], "prompt": "Tell me about Paris, " * 40 + "please."}
    long_answer = {**PAIRS[1], "chosen": "Blue is a primary colour, " * 20 + "truly."}
    rows = PAIRS * 4 + [long_prompt] * 4 + [long_answer] * 4
    spec = preference_spec(tiny_lm, dataset(session, rows, "lengths.json"), validation_fraction=0.0)

    # when the job runs
    job, _ = run(session, {**spec, "training": {**spec["training"], "max_steps": 1}})

    # then its events say how many examples max length skipped and how many it cut, and what to do
    note = next((m for m in events(session, job.id or 0) if m.startswith("data: ")), None)
    assert note == (
        "data: training.max_length 64: 4 of 24 examples skipped (nothing to learn within it: the prompt fills it) "
        "and 4 cut at it; raise it to train on them whole (the preview shows where the cut falls)"
    ), note
