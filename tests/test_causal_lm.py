"""Causal-LM jobs on a tiny Llama with a real tokenizer: masking, packing, learning, generation, streaming, merging.

The studio runs in-process (the engine called directly, the API through a TestClient); the real Celery
worker path is tests/test_causal_lm_browser.py. One database serves the whole module, so the LoRA adapter
trained once is generated from, streamed and merged by several tests.
"""

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import Session, select

from app.core.models import Adapter, Job, JobStatus, MetricPoint
from app.core.spec import JobSpec
from app.core.storage import get_store
from tests import lm
from tests.conftest import ADMIN_TOKEN
from tests.factories import create_dataset, create_job
from tests.lm import MEMORISE, alpaca_rows, json_bytes, prompt_of
from worker.recipes.causal_lm_data import IGNORE, Encoder, load_tokenizer

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: as fast as two on a busy 2-core machine, and bit-for-bit repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """conftest's studio_settings for the whole module: settings on a fresh, migrated data folder."""
    from app.core.db import get_engine, run_migrations
    from app.core.queue import get_celery
    from app.core.settings import get_settings

    with pytest.MonkeyPatch.context() as patch:
        data_dir = tmp_path_factory.mktemp("causal-lm") / "data"
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


@pytest.fixture(scope="module")
def alpaca_dataset(session: Session) -> int:
    """The first 40 rows of the Alpaca demo."""
    return int(create_dataset(session, json_bytes(alpaca_rows(40)), "alpaca.json").id or 0)


def causal_spec(base: Path, dataset_id: int, **fields: Any) -> dict[str, Any]:
    training = {
        "max_steps": 2,
        "batch_size": 4,
        "max_length": 256,
        "logging_steps": 1,
        **fields.pop("training", {}),
    }
    return {
        "task": "causal-lm",
        "base_model": str(base),
        "dataset_id": dataset_id,
        "training": training,
        **fields,
    }


def run(session: Session, spec: dict[str, Any]) -> Adapter:
    """Run a job in-process and return its adapter."""
    from worker.engine import run_job

    job = create_job(session, **spec)
    run_job(job.id)
    session.expire_all()
    finished = session.get(Job, job.id)
    assert finished is not None and finished.status == JobStatus.succeeded, finished and finished.error
    return session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of a Server-Sent Events body, pings left out."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":")
        )
        if "event" in fields:
            events.append((fields["event"], json.loads(fields.get("data", "{}"))))
    return events


# ---- masking -----------------------------------------------------------------------------------


def test_masked_labels_are_exactly_the_prompt_tokens(tiny_lm: Path) -> None:
    # given the tokenizer's own (ChatML) template and one Alpaca row
    from app.core.formats import example_from_row

    tokenizer = load_tokenizer(str(tiny_lm))
    encoder = Encoder(tokenizer, tokenizer.chat_template, 256, train_on_prompt=False)
    row = alpaca_rows(1)[0] | {"output": "Mix flour, eggs and milk; cook thin."}
    example = example_from_row(row, JobSpec(dataset_id=1, task="causal-lm").causal_lm, "text", 1)

    # when it is encoded
    (encoded,) = encoder.encode(example, 1)

    # then the masked tokens are exactly the rendered prompt (and the template's newline after the turn),
    # the trained ones the response, ending at EOS
    prompt = tokenizer.apply_chat_template(example.messages[:1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response = len(encoded.input_ids) - len(prompt_ids) - 1
    masked = [label == IGNORE for label in encoded.labels]
    assert masked == [True] * len(prompt_ids) + [False] * response + [True]
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    trained = encoded.input_ids[len(prompt_ids) : -1]
    assert encoded.labels[len(prompt_ids) : -1] == trained
    assert tokenizer.decode(trained) == row["output"] + "<|im_end|>"
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded.input_ids[-1:]) == "\n"


def test_train_on_prompt_and_plain_text_train_every_token_but_the_first(tiny_lm: Path) -> None:
    from app.core.formats import Example

    tokenizer = load_tokenizer(str(tiny_lm))
    encoder = Encoder(tokenizer, tokenizer.chat_template, 16, train_on_prompt=True)
    chat = Example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])

    (encoded,) = encoder.encode(chat, 1)
    pieces = encoder.encode(
        Example(text="A plain text for continued pre-training, longer than one piece."), 2
    )

    assert encoded.labels[0] == IGNORE and encoded.labels[1:] == encoded.input_ids[1:]
    assert len(pieces) > 1 and all(len(piece.input_ids) <= 16 for piece in pieces)
    assert (
        pieces[0].input_ids[0] == tokenizer.bos_token_id
        and pieces[-1].input_ids[-1] == tokenizer.eos_token_id
    )
    assert all(piece.labels[1:] == piece.input_ids[1:] for piece in pieces)


def test_preview_shows_the_examples_as_the_model_sees_them(
    api: Any, tiny_lm: Path, alpaca_dataset: int
) -> None:
    spec = causal_spec(tiny_lm, alpaca_dataset, validation_fraction=0, training={"max_length": 1024})

    response = api.post("/api/v1/jobs/preview?count=2", json=spec)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["template"] == "tokenizer" and len(body["examples"]) == 2
    first = body["examples"][0]
    assert [span["masked"] for span in first["spans"]] == [True, False, True]  # prompt, response, newline
    row = alpaca_rows(1)[0]
    assert first["spans"][1]["text"] == row["output"] + "<|im_end|>"
    assert first["spans"][0]["text"].endswith(
        f"user\n{row['instruction']}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert first["trained_tokens"] == len(first["spans"][1]["tokens"]) and not first["truncated"]


def test_preview_uses_the_named_template_chosen(api: Any, tiny_lm: Path, alpaca_dataset: int) -> None:
    spec = causal_spec(
        tiny_lm, alpaca_dataset, causal_lm={"template": "alpaca"}, training={"max_length": 1024}
    )

    body = api.post("/api/v1/jobs/preview", json=spec).json()

    masked, trained = body["examples"][0]["spans"][:2]
    assert body["template"] == "alpaca" and masked["text"].endswith("### Response:\n")
    assert trained["text"].endswith("<|im_end|>")  # alpaca ends the response with the tokenizer's EOS


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"base_model": "bundled/all-MiniLM-L6-v2"}, "base_model", "has no language-model head"),
        ({"causal_lm": {"output_column": "answer"}}, "causal_lm.output_column", "reads column 'answer'"),
        ({"causal_lm": {"input_column": "context"}}, "causal_lm.input_column", "set it empty"),
        ({"causal_lm": {"format": "chat"}}, "causal_lm.messages_column", "reads column 'messages'"),
        ({"causal_lm": {"format": "prompt-completion"}}, "causal_lm.prompt_column", "prompt-completion"),
        ({"training": {"max_length": 4096}}, "training.max_length", "at most 1024"),
        ({"validation_fraction": 0.001}, "validation_fraction", "leaves 0 for validation"),
        (
            {"method": "prefix", "causal_lm": {"packing": True}},
            "causal_lm.packing",
            "cannot be used with prefix",
        ),
    ],
)
def test_bad_causal_lm_specs_get_a_clear_4xx(
    api: Any, tiny_lm: Path, alpaca_dataset: int, change: dict[str, Any], field: str, words: str
) -> None:
    spec = causal_spec(tiny_lm, alpaca_dataset) | change

    response = api.post("/api/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and words in response.json()["detail"]


def test_label_column_does_not_matter_for_causal_lm(api: Any, tiny_lm: Path, alpaca_dataset: int) -> None:
    spec = causal_spec(tiny_lm, alpaca_dataset, label_column="no such column")

    assert api.post("/api/v1/jobs/preview?count=1", json=spec).status_code == 200


def test_chat_rows_that_are_not_message_lists_are_refused(api: Any, session: Session, tiny_lm: Path) -> None:
    dataset = create_dataset(session, b'{"messages": "hello"}\n{"messages": "again"}\n', "chat.jsonl")
    spec = causal_spec(tiny_lm, int(dataset.id or 0), causal_lm={"format": "chat"}, validation_fraction=0)

    response = api.post("/api/v1/jobs", json=spec)

    assert response.status_code == 422
    assert "a list of {role, content} messages" in response.json()["detail"]


# ---- packing -----------------------------------------------------------------------------------


def test_packing_keeps_examples_apart(session: Session, tiny_lm: Path) -> None:
    # given five short examples packed by the recipe into rows of 512 tokens
    from app.core.base_models import resolve_base_model
    from worker.recipes import causal_lm

    rows = [row | {"output": row["output"][:150]} for row in alpaca_rows(5)]
    dataset = create_dataset(session, json_bytes(rows), "short.json")
    spec = JobSpec.model_validate(
        causal_spec(
            tiny_lm,
            int(dataset.id or 0),
            validation_fraction=0,
            causal_lm={"packing": True},
            training={"max_length": 512},
        )
    )
    prepared = causal_lm.prepare(spec, resolve_base_model(str(tiny_lm)), dataset, None, {})
    assert len(prepared.train_dataset) < 5  # several examples share a row

    # when a packed batch goes through the training model
    batch = prepared.collator(prepared.train_dataset)
    model = prepared.model.train()  # dropout is off: train mode is deterministic
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits

        # then every example's logits equal its logits alone
        compared = 0
        for row_index, positions in enumerate(batch["position_ids"].tolist()):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for start, end in zip(starts, starts[1:], strict=False):
                ids = batch["input_ids"][row_index, start:end]
                if ids[0] == prepared.tokenizer.pad_token_id:
                    continue  # padding after the last example
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(packed_logits[row_index, start:end], alone, atol=1e-5, rtol=1e-4)
                compared += 1
        assert compared == 5

        # and without restarting positions (plain concatenation) they would not
        leaky = model(input_ids=batch["input_ids"][:1]).logits[0]
        second = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0][1]
        assert (leaky[second:] - packed_logits[0, second:]).abs().max() > 1e-3
    labels = batch["labels"][0].tolist()
    assert all(labels[i] == IGNORE for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0)


# ---- learning, generation, streaming, merging ---------------------------------------------------


@pytest.fixture(scope="module")
def memorised(session: Session, tiny_lm: Path) -> Adapter:
    """A LoRA adapter trained until it reproduces four short responses (evaluated on the same rows)."""
    dataset = create_dataset(session, json_bytes(MEMORISE), "memorise.json")
    spec = causal_spec(
        tiny_lm,
        int(dataset.id or 0),
        validation_fraction=0,
        validation_dataset_id=dataset.id,
        method="lora",
        method_config={"r": 16, "alpha": 32},
        training={
            "max_steps": 60,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "lr_scheduler": "constant",
            "max_length": 64,
            "logging_steps": 10,
            "eval_steps": 30,
            "seed": 0,
        },
    )
    return run(session, spec)


def test_the_same_spec_trains_the_same_adapter(session: Session, tiny_lm: Path, alpaca_dataset: int) -> None:
    spec = causal_spec(
        tiny_lm, alpaca_dataset, validation_fraction=0, training={"max_steps": 2, "max_length": 64}
    )

    first, second = run(session, spec), run(session, spec)

    weights = [
        (get_store().path(a.storage_key) / "adapter_model.safetensors").read_bytes() for a in (first, second)
    ]
    assert weights[0] == weights[1]


def test_lora_memorises_responses_and_generation_stops_at_eos(session: Session, memorised: Adapter) -> None:
    from app.core.formats import GenerationSettings
    from worker.generation import generate

    folder = get_store().path(memorised.storage_key)
    studio = json.loads((folder / "studio.json").read_text())
    assert studio["template"] == "tokenizer" and studio["data_format"] == "alpaca"
    for row in MEMORISE:
        result = generate(
            memorised.id or 0, folder, GenerationSettings(prompt=prompt_of(row), max_new_tokens=40)
        )

        assert result.text == row["output"]
        assert result.finish_reason == "eos" and result.token_ids[-1] == studio["eos_token_id"]
        assert len(result.token_ids) < 40


def test_eval_loss_perplexity_and_token_accuracy_are_logged(session: Session, memorised: Adapter) -> None:
    points = session.exec(select(MetricPoint).where(MetricPoint.job_id == memorised.job_id)).all()
    train = [point.values["loss"] for point in points if point.split == "train"]
    evals = [point.values for point in points if point.split == "eval"]

    assert len(evals) == 2 and {"loss", "perplexity", "token_accuracy"} <= set(evals[-1])
    assert evals[-1]["token_accuracy"] == 1.0 > evals[0]["token_accuracy"] - 1e-9
    assert evals[-1]["perplexity"] == pytest.approx(2.718281828 ** evals[-1]["loss"], rel=1e-3)
    assert train[-1] < train[0]
    assert memorised.metrics["token_accuracy"] == 1.0


def test_streamed_tokens_arrive_in_order_and_the_base_answers_beside(api: Any, memorised: Adapter) -> None:
    row = MEMORISE[0]
    body = {"prompt": prompt_of(row), "max_new_tokens": 40, "stream": True}

    with api.stream("POST", f"/api/v1/adapters/{memorised.id}/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    base = api.post(
        f"/api/v1/adapters/{memorised.id}/generate", json=body | {"stream": False, "use_adapter": False}
    )

    tokens = [data for event, data in events if event == "token"]
    assert [event for event, _ in events] == ["token"] * len(tokens) + ["done"]
    assert [data["index"] for data in tokens] == list(range(len(tokens))) and len(tokens) > 1
    done = events[-1][1]
    assert "".join(data["text"] for data in tokens) == done["text"] == row["output"]
    assert done["finish_reason"] == "eos" and done["prompt_text"].endswith("<|im_start|>assistant\n")
    assert (
        base.status_code == 200 and base.json()["text"] != row["output"]
    )  # the untrained base, same weights


def test_generate_refuses_bad_requests(api: Any, memorised: Adapter) -> None:
    assert api.post(f"/api/v1/adapters/{memorised.id}/generate", json={"prompt": ""}).status_code == 422
    assert api.post("/api/v1/adapters/999/generate", json={"prompt": "Hi"}).status_code == 404
    too_many = {"prompt": "Hi", "max_new_tokens": 5000}
    assert api.post(f"/api/v1/adapters/{memorised.id}/generate", json=too_many).status_code == 422


def _unzip(content: bytes, target: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        archive.extractall(target)
    return target


def _logits_of_base_plus_adapter(base: Path, adapter_folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base)), str(adapter_folder)
    ).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_gives_the_same_logits_as_base_plus_adapter(
    api: Any, memorised: Adapter, tiny_lm: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    response = api.get(f"/api/v1/adapters/{memorised.id}/merged")

    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    folder = _unzip(response.content, tmp_path / "merged")
    assert not (folder / "adapter_config.json").exists() and (folder / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(tiny_lm)).chat_template
    ids = torch.tensor([tokenizer("<|im_start|>user\nWhat is the capital of France?")["input_ids"]])
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    expected = _logits_of_base_plus_adapter(tiny_lm, get_store().path(memorised.storage_key), ids)
    torch.testing.assert_close(merged_logits, expected, atol=1e-5, rtol=1e-4)


def test_qlora_adapter_merges_into_the_dequantized_base(
    api: Any, session: Session, tiny_lm: Path, tmp_path: Path
) -> None:
    from worker.methods import registry

    if "qlora" not in registry():
        pytest.skip("no qlora method registered")
    dataset = create_dataset(session, json_bytes(MEMORISE[:3]), "qlora.json")
    adapter = run(
        session,
        causal_spec(
            tiny_lm,
            int(dataset.id or 0),
            validation_fraction=0,
            method="qlora",
            training={"max_steps": 3, "learning_rate": 1e-2, "max_length": 64},
        ),
    )

    response = api.get(f"/api/v1/adapters/{adapter.id}/merged")

    assert response.status_code == 200, response.text
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(_unzip(response.content, tmp_path / "merged"))).eval()
    assert merged.dtype == torch.float32 and not hasattr(merged.config, "quantization_config")
    ids = torch.tensor([[1, 3, 40, 50, 60, 70]])
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    # the full-precision base with the adapter applied: what the 4-bit base + adapter approximates
    expected = _logits_of_base_plus_adapter(tiny_lm, get_store().path(adapter.storage_key), ids)
    torch.testing.assert_close(merged_logits, expected, atol=1e-5, rtol=1e-4)


def test_prompt_based_adapters_cannot_be_merged(tmp_path: Path) -> None:
    from app.core.errors import InvalidSpec
    from worker.merge import check_mergeable

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(InvalidSpec, match="cannot be merged"):
        check_mergeable(tmp_path, 7, "prefix")
    with pytest.raises(InvalidSpec, match="not a peft weight adapter"):
        check_mergeable(tmp_path / "missing", 7, "lora")
    with pytest.raises(InvalidSpec, match="already a complete model"):
        check_mergeable(tmp_path, 7, "full")


# ---- the tiny model, from the command line --------------------------------------------------------


def test_make_tiny_lm_writes_a_model_with_a_chat_template(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(row) for row in MEMORISE))

    result = CliRunner().invoke(
        cli, ["make-tiny-lm", str(tmp_path / "tiny"), "--corpus", str(corpus), "--vocab-size", "400"]
    )

    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tiny"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny"))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>"
    text = "Drink enough water every day."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert model.config.vocab_size == len(tokenizer) and model.config.model_type == "llama"
