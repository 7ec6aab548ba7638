"""Padding-free packing (causal_lm.packing on): the same batch packed or padded gives the same loss and gradients.

A tiny Llama with a real tokenizer (tests/lm.py), float32, one thread. The tolerance is float32 summation order:
the packed batch adds the same per-token terms in another order (rows of several examples, examples sorted
longest first), so the loss and every gradient agree to about 1e-6 relative; we allow atol 1e-5, rtol 1e-4.
"""

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import Session

from app.core.spec import JobSpec
from tests import lm
from tests.factories import create_dataset
from tests.lm import alpaca_rows, json_bytes

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module

ATOL, RTOL = 1e-5, 1e-4
MAX_LENGTH = 160


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _examples(tiny_lm: Path, count: int) -> tuple[Any, list[Any]]:
    from app.core.formats import example_from_row
    from app.core.spec import CausalLMSettings
    from worker.recipes.causal_lm_data import Encoder, encode_all, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_lm))
    encoder = Encoder(tokenizer, tokenizer.chat_template, MAX_LENGTH, train_on_prompt=False)
    short = [row | {"output": row["output"][:120]} for row in alpaca_rows(count)]
    rows = [(n, example_from_row(row, CausalLMSettings(), "text", n)) for n, row in enumerate(short, 1)]
    encoded, _, _ = encode_all(encoder, rows)
    return tokenizer, encoded


def _model(tiny_lm: Path) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(tiny_lm))
    config.use_cache = False
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_lm), config=config, dtype=torch.float32).train()


def _loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("row_tokens", [MAX_LENGTH, None], ids=["rows-of-max-length", "one-row"])
def test_packed_batch_has_the_unpacked_loss_and_gradients(tiny_lm: Path, row_tokens: int | None) -> None:
    from transformers import DataCollatorForSeq2Seq

    from worker.recipes.causal_lm_data import IGNORE, PaddingFreeCollator

    # given eight Alpaca examples of different lengths, batched padded and padding-free
    tokenizer, examples = _examples(tiny_lm, 8)
    assert len({len(e.input_ids) for e in examples}) > 4
    padded = dict(
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)(
            [e.features() for e in examples]
        )
    )
    packed = PaddingFreeCollator(tokenizer.pad_token_id, row_tokens)([e.packable() for e in examples])
    model = _model(tiny_lm)

    # when both go through the same model, forward and backward
    padded_loss, padded_grads = _loss_and_grads(model, padded)
    packed_loss, packed_grads = _loss_and_grads(model, packed)

    # then loss and every gradient agree within float32 reordering
    torch.testing.assert_close(packed_loss, padded_loss, atol=ATOL, rtol=RTOL)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=ATOL, rtol=RTOL, msg=name)

    # and the packed batch carries (almost) no padding: the same trained tokens in fewer positions
    assert "attention_mask" not in packed
    assert (packed["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()
    real_tokens = sum(len(e.input_ids) for e in examples)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    if row_tokens is None:
        assert packed["input_ids"].shape == (1, real_tokens)
    else:
        assert packed["input_ids"].shape[1] <= MAX_LENGTH

    # and it is the restarting positions that keep examples apart: without them the logits change
    with torch.no_grad():
        inputs = {key: value for key, value in packed.items() if key != "labels"}
        continuous = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
        leaky = model(**{**inputs, "position_ids": continuous}).logits
        assert (leaky - model(**inputs).logits).abs().max() > 1e-3


def test_auto_packing_is_on_for_llama_off_for_virtual_tokens(studio_settings: Path, tiny_lm: Path) -> None:
    from app.core.base_models import resolve_base_model
    from app.core.db import get_engine
    from worker.recipes import causal_lm

    with Session(get_engine()) as session:
        rows = [row | {"output": row["output"][:100]} for row in alpaca_rows(6)]
        dataset = create_dataset(session, json_bytes(rows), "short.json")
        base = {
            "task": "causal-lm",
            "base_model": str(tiny_lm),
            "dataset_id": dataset.id,
            "validation_fraction": 0,
            "training": {"max_steps": 1, "batch_size": 6, "max_length": MAX_LENGTH},
        }

        # given the default spec (packing auto, LoRA) on a Llama
        spec = JobSpec.model_validate(base)
        assert spec.causal_lm.packing == "auto"
        prepared = causal_lm.prepare(spec, resolve_base_model(str(tiny_lm)), dataset, None, {})

        # then it trains padding-free: one item per example, batches packed with restarting positions
        assert prepared.metadata["packing"] == "on" and not prepared.notes
        assert len(prepared.train_dataset) == 6
        batch = prepared.collator(prepared.train_dataset)
        assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) >= 6

        # given prompt tuning (virtual tokens), auto is off and says why
        prompt = JobSpec.model_validate({**base, "method": "prompt"})
        mode, why = causal_lm.packing_mode(prompt, prepared.model)
        assert mode == "off" and why is not None and "virtual tokens" in why

        # and a model that ignores packed position ids refuses on and turns auto off
        class OldModel(torch.nn.Module):
            config = prepared.model.config

        with pytest.raises(ValueError, match="does not keep packed examples apart"):
            causal_lm.packing_mode(
                JobSpec.model_validate({**base, "causal_lm": {"packing": "on"}}), OldModel()
            )
        assert causal_lm.packing_mode(spec, OldModel())[0] == "off"

        # and the old boolean still means what it meant
        assert JobSpec.model_validate({**base, "causal_lm": {"packing": True}}).causal_lm.packing == "rows"
        assert JobSpec.model_validate({**base, "causal_lm": {"packing": False}}).causal_lm.packing == "off"


def test_auto_packs_rows_on_a_gpu_and_keeps_the_rules_cadence(
    studio_settings: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU worker ``auto`` packs rows (a step of batch_size examples leaves a GPU idle); the auto rule's
    epochs stay and its evaluation and logging cadence is scaled to the packed steps. Only the GPU decision is
    patched: the job trains for real, on this CPU."""
    from sqlmodel import select

    from app.core.db import get_engine
    from app.core.models import Adapter, Job, JobEvent, JobStatus, MetricPoint
    from tests.factories import create_job
    from worker.engine import run_job
    from worker.recipes import causal_lm

    monkeypatch.setattr(causal_lm, "trains_on_gpu", lambda: True)
    with Session(get_engine()) as session:
        rows = [row | {"output": row["output"][:60]} for row in alpaca_rows(30)]
        dataset = create_dataset(session, json_bytes(rows), "short.json")
        # given the default spec (packing, epochs, evaluation and logging all auto): 24 training rows at batch 4
        job = create_job(
            session,
            task="causal-lm",
            base_model=str(tiny_lm),
            dataset_id=dataset.id,
            validation_fraction=0.2,
            training={"batch_size": 4, "max_length": 256},
        )
        # when a GPU worker runs it
        run_job(job.id)
        session.expire_all()
        finished = session.get(Job, job.id)
        assert finished is not None and finished.status == JobStatus.succeeded, finished and finished.error
        events = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == job.id))]
        note = next(m for m in events if m.startswith("packing auto: rows on a GPU"))
        assert session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()
        points = session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id)).all()

    # then the examples were packed into rows, and the note says how many steps that makes
    counts = re.search(r"(\d+) examples in (\d+) rows: (\d+) steps \((\d+) unpacked\)", note)
    assert counts is not None, note
    examples, packed_rows, steps, unpacked = (int(n) for n in counts.groups())
    assert examples == 24 and packed_rows < examples / 2
    # the rule's epochs (20: 6 unpacked steps an epoch is far from its 200) are kept: 20 passes over the rows
    assert unpacked == 20 * 6 and steps == 20 * math.ceil(packed_rows / 4)
    train_steps = sorted({p.step for p in points if p.split == "train"})
    assert max(train_steps) == steps
    # and it still evaluates 10 times and logs about 20 times, not every 12 and 6 steps of the unpacked count
    eval_steps = sorted({p.step for p in points if p.split == "eval"})
    every = math.ceil(steps / 10)
    assert f"eval every {every} steps" in note
    assert eval_steps[: len(range(every, steps + 1, every))] == list(range(every, steps + 1, every))
    assert len(train_steps) >= 15


def test_flex_attention_keeps_packed_rows_apart(studio_settings: Path, tiny_lm: Path) -> None:
    """``training.attention: flex_attention`` loads the model with FlexAttention, whose block mask from the packed
    position ids gives each example the logits it has alone (forward only: FlexAttention has no backward on CPUs,
    so the spec asks for a GPU; the mask and the kernel are the GPU's)."""
    from app.core.base_models import resolve_base_model
    from app.core.db import get_engine
    from worker.recipes import causal_lm

    with Session(get_engine()) as session:
        rows = [row | {"output": row["output"][:80]} for row in alpaca_rows(6)]
        dataset = create_dataset(session, json_bytes(rows), "short.json")
        base = {
            "task": "causal-lm",
            "base_model": str(tiny_lm),
            "dataset_id": dataset.id,
            "validation_fraction": 0,
            "training": {"max_steps": 1, "batch_size": 6, "max_length": MAX_LENGTH},
            "causal_lm": {"packing": "rows"},
            "resources": {"accelerator": "gpu"},
        }
        flex = JobSpec.model_validate(
            {**base, "training": {**base["training"], "attention": "flex_attention"}}
        )
        prepared = causal_lm.prepare(flex, resolve_base_model(str(tiny_lm)), dataset, None, {})
        sdpa = causal_lm.prepare(
            JobSpec.model_validate(base), resolve_base_model(str(tiny_lm)), dataset, None, {}
        )
    assert prepared.model.config._attn_implementation == "flex_attention"
    assert sdpa.model.config._attn_implementation == "sdpa"
    batch = prepared.collator(prepared.train_dataset)
    assert len(prepared.train_dataset) < 6  # several examples share a row
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        flex_logits = prepared.model.eval()(**inputs).logits
        torch.testing.assert_close(flex_logits, sdpa.model.eval()(**inputs).logits, atol=ATOL, rtol=RTOL)
        row = batch["position_ids"][0].tolist()
        second = [i for i, p in enumerate(row) if p == 0][1]
        end = next((i for i, p in enumerate(row) if i > second and p == 0), len(row))
        alone = prepared.model(input_ids=batch["input_ids"][:1, second:end]).logits[0]
        torch.testing.assert_close(flex_logits[0, second:end], alone, atol=ATOL, rtol=RTOL)
