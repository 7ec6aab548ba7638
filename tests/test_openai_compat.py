"""The official ``openai`` client against a running studio (real HTTP on 127.0.0.1): files, fine-tuning jobs,
events, checkpoints, cancel, models, chat and completions (streamed and not), errors in OpenAI's shape.

One studio (``peft-studio serve`` with a worker) serves the module; its webhook dispatcher thread is checked
too: a loopback receiver gets the signed job.succeeded and job.cancelled events.
"""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from app.services.webhooks import verify_signature
from tests import lm
from tests.lm import MEMORISE, prompt_of
from tests.studio import RunningStudio, run_studio
from tests.webhook_receiver import Receiver, webhook_receiver

pytestmark = pytest.mark.e2e

tiny_lm = lm.tiny_lm
SECRET = "openai-test-secret-0123"


def _chat_jsonl(repeat: int) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": prompt_of(row)},
                {"role": "assistant", "content": row["output"]},
            ]
        }
        for row in MEMORISE * repeat
    ]
    return "\n".join(json.dumps(row) for row in rows).encode()


def _prompt_completion_jsonl() -> bytes:
    rows = [{"prompt": prompt_of(row), "completion": row["output"]} for row in MEMORISE]
    return "\n".join(json.dumps(row) for row in rows).encode()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as running:
        yield running


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[RunningStudio]:
    data_dir = tmp_path_factory.mktemp("openai") / "data"
    with run_studio(
        data_dir,
        workers=1,
        PEFT_STUDIO_WEBHOOK_POLL_SECONDS="0.3",
        PEFT_STUDIO_TORCH_THREADS="1",
        PEFT_STUDIO_OUTBOUND_ALLOWED_HOSTS="127.0.0.1",  # the loopback receiver
    ) as running:
        with running.client() as http:
            hook = http.post("/api/v1/webhooks", json={"url": receiver.url, "secret": SECRET})
            assert hook.status_code == 201, hook.text
        yield running


@pytest.fixture(scope="module")
def client(studio: RunningStudio) -> openai.OpenAI:
    return openai.OpenAI(api_key=studio.token, base_url=studio.url + "/v1", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def finished_job(client: openai.OpenAI, tiny_lm: Path) -> dict[str, Any]:
    """A fine-tuning job on the tiny LM, followed through its events until it succeeds."""
    training = client.files.create(file=("train.jsonl", _chat_jsonl(4)), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", _chat_jsonl(1)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_lm),
        training_file=training.id,
        validation_file=validation.id,
        suffix="tiny",
        seed=7,
        metadata={"team": "nlp"},
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 20}},
        },
        extra_body={
            "peft": {
                "method": "lora",
                "config": {"r": 8, "alpha": 16},
                "training": {"max_steps": 6, "logging_steps": 2, "eval_steps": 3, "max_length": 64},
            }
        },
    )
    assert job.status == "queued" and job.id.startswith("ftjob-")
    events: dict[str, Any] = {}
    deadline = time.monotonic() + 300
    while True:
        for event in client.fine_tuning.jobs.list_events(job.id, limit=100).data:
            events[event.id] = event
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.2)
    for event in client.fine_tuning.jobs.list_events(job.id, limit=100).data:
        events[event.id] = event
    return {"job": job, "events": list(events.values()), "training": training, "validation": validation}


def test_files_upload_list_and_refuse_bad_files(client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("pc.jsonl", _prompt_completion_jsonl()), purpose="fine-tune")
    assert (
        uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune" and uploaded.status == "processed"
    )
    assert uploaded.id in [item.id for item in client.files.list()]
    assert client.files.retrieve(uploaded.id).filename == "pc.jsonl"
    # the same file again is the same file
    assert (
        client.files.create(file=("pc.jsonl", _prompt_completion_jsonl()), purpose="fine-tune").id
        == uploaded.id
    )

    with pytest.raises(openai.BadRequestError) as wrong_shape:
        client.files.create(file=("bad.jsonl", b'{"question": "x", "answer": "y"}\n'), purpose="fine-tune")
    error = wrong_shape.value.body
    assert isinstance(error, dict) and error["param"] == "file" and "messages" in error["message"]

    with pytest.raises(openai.BadRequestError) as no_assistant:
        client.files.create(
            file=("u.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n'), purpose="fine-tune"
        )
    assert "Row 1" in str(no_assistant.value)


def test_a_job_runs_to_success_with_events_and_metrics(finished_job: dict[str, Any], tiny_lm: Path) -> None:
    job = finished_job["job"]
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{tiny_lm.name}:tiny:{job.id}"
    assert (
        job.training_file == finished_job["training"].id
        and job.validation_file == finished_job["validation"].id
    )
    assert job.seed == 7 and job.metadata == {"team": "nlp"} and job.finished_at is not None
    assert job.method is not None and job.method.type == "supervised"
    assert job.hyperparameters.batch_size == 4

    events = finished_job["events"]
    messages = [event.message for event in events if event.type == "message"]
    assert "succeeded" in messages and "queued" in messages
    metrics = [event.data for event in events if event.type == "metrics"]
    train = [data for data in metrics if data["train_loss"] is not None]
    valid = [data for data in metrics if data["valid_loss"] is not None]
    assert train and valid, metrics
    assert all(isinstance(data["step"], int) and data["step"] >= 0 for data in metrics)


def test_events_page_newest_first(client: openai.OpenAI, finished_job: dict[str, Any]) -> None:
    job_id = finished_job["job"].id
    first = client.fine_tuning.jobs.list_events(job_id, limit=2)
    assert len(first.data) == 2 and first.has_more
    second = client.fine_tuning.jobs.list_events(job_id, limit=2, after=first.data[-1].id)
    assert {event.id for event in first.data}.isdisjoint(event.id for event in second.data)
    assert first.data[0].created_at >= second.data[0].created_at
    assert first.data[0].message == "succeeded"


def test_checkpoints_are_listed(client: openai.OpenAI, finished_job: dict[str, Any]) -> None:
    job = finished_job["job"]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints, "at least the final adapter is a checkpoint"
    assert all(checkpoint.fine_tuning_job_id == job.id for checkpoint in checkpoints)
    assert all(
        checkpoint.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for checkpoint in checkpoints
    )
    steps = [checkpoint.step_number for checkpoint in checkpoints]
    assert steps == sorted(steps, reverse=True) and steps[0] == 6


def test_jobs_list_pages_with_after_and_has_more(
    client: openai.OpenAI, finished_job: dict[str, Any], tiny_lm: Path
) -> None:
    second = client.fine_tuning.jobs.create(
        model=str(tiny_lm),
        training_file=finished_job["training"].id,
        extra_body={"peft": {"training": {"max_steps": 2000, "max_length": 64}}},
    )
    cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status in ("cancelled", "running")

    first_page = client.fine_tuning.jobs.list(limit=1)
    assert [job.id for job in first_page.data] == [second.id] and first_page.has_more
    next_page = client.fine_tuning.jobs.list(limit=1, after=second.id)
    assert [job.id for job in next_page.data] == [finished_job["job"].id]

    deadline = time.monotonic() + 120
    while client.fine_tuning.jobs.retrieve(second.id).status != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(second.id)


def test_models_list_bases_and_the_fine_tuned_model(
    client: openai.OpenAI, finished_job: dict[str, Any], tiny_lm: Path
) -> None:
    ids = [model.id for model in client.models.list()]
    assert finished_job["job"].fine_tuned_model in ids and str(tiny_lm) in ids
    assert (
        client.models.retrieve(finished_job["job"].fine_tuned_model).id
        == finished_job["job"].fine_tuned_model
    )


def test_chat_with_the_result_whole_and_streamed(client: openai.OpenAI, finished_job: dict[str, Any]) -> None:
    model = finished_job["job"].fine_tuned_model
    messages: Any = [{"role": "user", "content": prompt_of(MEMORISE[0])}]

    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    answer = whole.choices[0].message.content
    assert isinstance(answer, str) and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 12

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == answer  # greedy: the same tokens either way
    finishes = [
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_completions_whole_and_streamed(client: openai.OpenAI, finished_job: dict[str, Any]) -> None:
    model = finished_job["job"].fine_tuned_model
    whole = client.completions.create(model=model, prompt=prompt_of(MEMORISE[1]), max_tokens=8, temperature=0)
    streamed = client.completions.create(
        model=model, prompt=prompt_of(MEMORISE[1]), max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text


def test_errors_come_back_in_openais_shape(
    client: openai.OpenAI, finished_job: dict[str, Any], tiny_lm: Path
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-99999")
    assert isinstance(missing.value.body, dict) and "ftjob-99999" in missing.value.body["message"]

    with pytest.raises(openai.NotFoundError) as no_file:
        client.fine_tuning.jobs.create(model=str(tiny_lm), training_file="file-99999")
    assert isinstance(no_file.value.body, dict) and no_file.value.body["param"] == "training_file"

    with pytest.raises(openai.BadRequestError) as bad_method:
        client.fine_tuning.jobs.create(
            model=str(tiny_lm),
            training_file=finished_job["training"].id,
            extra_body={"peft": {"method": "magic"}},
        )
    assert isinstance(bad_method.value.body, dict) and bad_method.value.body["param"] == "peft.method"

    with pytest.raises(openai.BadRequestError) as bad_epochs:
        client.fine_tuning.jobs.create(
            model=str(tiny_lm),
            training_file=finished_job["training"].id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
        )
    assert (
        isinstance(bad_epochs.value.body, dict)
        and bad_epochs.value.body["param"] == "hyperparameters.n_epochs"
    )

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="ft:nothing:ftjob-99999", messages=[{"role": "user", "content": "hi"}]
        )

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="pst_wrong", base_url=str(client.base_url), max_retries=0).models.list()


def test_the_webhook_receives_signed_job_events(receiver: Receiver, finished_job: dict[str, Any]) -> None:
    job_number = int(finished_job["job"].id.removeprefix("ftjob-"))

    def about(event_type: str, job_id: int | None = None) -> Any:
        def match(request: Any) -> bool:
            event = json.loads(request.body)
            return bool(
                event["type"] == event_type and (job_id is None or event["data"]["job"]["id"] == job_id)
            )

        return match

    succeeded = receiver.wait_for(about("job.succeeded", job_number))
    headers = succeeded.headers
    assert verify_signature(
        SECRET, headers["x-peftstudio-timestamp"], succeeded.body, headers["x-peftstudio-signature"]
    )
    event = json.loads(succeeded.body)
    assert event["data"]["fine_tuned_model"] == finished_job["job"].fine_tuned_model
    assert event["data"]["adapter_id"] is not None


def test_a_classification_adapter_answers_with_its_label(
    studio: RunningStudio, client: openai.OpenAI, tmp_path: Path
) -> None:
    from tests.studio import sst2_slice, wait_for_job

    with studio.client() as http:
        with sst2_slice(tmp_path / "sst2.csv", 40).open("rb") as stream:
            dataset = http.post("/api/v1/datasets", files={"file": ("sst2.csv", stream)}).json()
        spec = {
            "dataset_id": dataset["id"],
            "validation_fraction": 0,
            "training": {"max_steps": 2, "batch_size": 8},
        }
        job = http.post("/api/v1/jobs", json=spec).json()
        assert wait_for_job(http, job["id"])["status"] == "succeeded"
        model = next(
            m["id"] for m in http.get("/v1/models").json()["data"] if m["id"].endswith(f"ftjob-{job['id']}")
        )

        classified = http.post(
            "/v1/classifications", json={"model": model, "input": ["a gripping film", "dull"]}
        )
        assert classified.status_code == 200, classified.text
        labels = [item["label"] for item in classified.json()["data"]]
        assert set(labels) <= {"0", "1"} and len(labels) == 2
        assert all(abs(sum(item["probabilities"].values()) - 1) < 1e-4 for item in classified.json()["data"])

    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "a gripping film"}]
    )
    assert answer.choices[0].message.content == labels[0] and answer.choices[0].finish_reason == "stop"
    completion = client.completions.create(model=model, prompt="dull")
    assert completion.choices[0].text == labels[1]


def _preference_jsonl() -> bytes:
    """OpenAI's preference file: input messages, a preferred and a non-preferred answer."""
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": prompt_of(row)}]},
            "preferred_output": [{"role": "assistant", "content": row["output"]}],
            "non_preferred_output": [{"role": "assistant", "content": "I would rather not say."}],
        }
        for row in MEMORISE * 4
    ]
    return "\n".join(json.dumps(row) for row in rows).encode()


def test_a_dpo_job_from_openais_preference_file(
    client: openai.OpenAI, studio: RunningStudio, tiny_lm: Path
) -> None:
    # given OpenAI's preference JSONL
    training = client.files.create(file=("prefs.jsonl", _preference_jsonl()), purpose="fine-tune")
    # when a job asks for method dpo with a beta
    job = client.fine_tuning.jobs.create(
        model=str(tiny_lm),
        training_file=training.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 8}}},
        extra_body={"peft": {"training": {"max_steps": 4, "logging_steps": 1, "max_length": 64}}},
    )
    # then a DPO job runs on the worker and reports back as OpenAI's dpo method
    assert job.method is not None and job.method.type == "dpo"
    deadline = time.monotonic() + 300
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.method is not None and job.method.dpo is not None
    hyper = job.method.dpo.hyperparameters
    assert hyper is not None and hyper.beta == 0.2
    number = int(job.id.removeprefix("ftjob-"))
    with studio.client() as http:
        spec = http.get(f"/api/v1/jobs/{number}").json()["spec"]
        metrics = http.get(f"/api/v1/jobs/{number}/metrics").json()
    assert spec["task"] == "preference" and spec["preference"]["loss"] == "dpo"
    assert spec["preference"]["prompt_column"] == "input" and spec["preference"]["beta"] == 0.2
    assert "rewards/margins" in json.dumps(metrics)
    # the aligned model answers through the OpenAI layer like any fine-tuned model
    assert job.fine_tuned_model is not None
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    # a supervised request on a preference file is refused, naming the file
    with pytest.raises(openai.BadRequestError) as mismatch:
        client.fine_tuning.jobs.create(model=str(tiny_lm), training_file=training.id)
    assert isinstance(mismatch.value.body, dict) and mismatch.value.body["param"] == "training_file"
