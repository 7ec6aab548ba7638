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


def _model(tiny_lm: Path, attention: str = "sdpa") -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker import packed_attention

    config = AutoConfig.from_pretrained(str(tiny_lm))
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm), config=config, dtype=torch.float32).train()
    if attention == packed_attention.NAME:
        model.set_attn_implementation(packed_attention.register())
    return model


def _loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen"])
@pytest.mark.parametrize("row_tokens", [MAX_LENGTH, None], ids=["rows-of-max-length", "one-row"])
def test_packed_batch_has_the_unpacked_loss_and_gradients(
    tiny_lm: Path, row_tokens: int | None, attention: str
) -> None:
    """Under SDPA (a block-diagonal mask over each row) and sdpa_varlen (attention per example, no mask)."""
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
    model = _model(tiny_lm, attention)

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
        assert prepared.metadata["packing"] == "on"
        assert len(prepared.train_dataset) == 6
        batch = prepared.collator(prepared.train_dataset)
        assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) >= 6
        # with each example attending within itself (this CPU worker), so the whole batch is one row
        assert prepared.model.config._attn_implementation == "sdpa_varlen"
        assert prepared.notes == [
            "attention auto: sdpa_varlen, each packed example attends within itself (no block-diagonal mask "
            "over the row)"
        ]
        assert batch["input_ids"].shape[0] == 1

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
    assert sdpa.model.config._attn_implementation == "sdpa_varlen"  # auto, packed rows on this CPU
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


def _reference_varlen(new_signature: bool) -> Any:
    """A CPU stand-in for PyTorch's CUDA ``varlen_attn``: causal SDPA per ``cu_seqlens`` span of flat tensors.

    ``new_signature`` is torch > 2.10's (``window_size``, ``enable_gqa``, ``scale``); else torch 2.10's
    (``is_causal`` only, equal head counts).
    """
    import torch.nn.functional as F

    def attend(
        query: Any, key: Any, value: Any, cu_q: Any, cu_k: Any, max_q: int, max_k: int, **options: Any
    ) -> Any:
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and int(cu_q[-1]) == query.shape[0]
        bounds = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        if new_signature:
            assert options.pop("window_size") == (-1, 0)
            gqa = options.pop("enable_gqa", False)
            scale = options.pop("scale", None)
        else:
            assert options.pop("is_causal") is True
            assert key.shape[1] == query.shape[1]  # no GQA here: the caller repeats the key/value heads
            gqa, scale = False, None
        assert not options
        spans = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))
            spans.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale))
        return torch.cat([span.transpose(0, 1) for span in spans], dim=0)

    # the keyword names each torch version's varlen_attn takes (what packed_attention reads off the signature)
    positional = {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "return_aux"}
    extra = {"scale", "window_size", "enable_gqa"} if new_signature else {"is_causal"}
    return attend, frozenset(positional | extra)


def test_sdpa_varlen_attends_per_example_and_falls_back_to_the_mask(
    tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sdpa_varlen`` runs SDPA's causal kernel on each packed example (no mask), gives a padded batch
    (evaluation: left padding, an attention mask) SDPA's own result, and hands a whole packed batch to one
    flash-attention varlen call where PyTorch has one (CUDA: here a CPU stand-in with each signature, so the
    flattening, ``cu_seqlens`` and grouped-query heads are what is checked; the kernel is PyTorch's)."""
    from transformers import DataCollatorForSeq2Seq

    from worker import packed_attention
    from worker.recipes.causal_lm_data import IGNORE, PaddingFreeCollator

    tokenizer, examples = _examples(tiny_lm, 6)
    packed = PaddingFreeCollator(tokenizer.pad_token_id, MAX_LENGTH)([e.packable() for e in examples])
    sdpa, varlen = _model(tiny_lm), _model(tiny_lm, "sdpa_varlen")
    layers = sdpa.config.num_hidden_layers

    # given a spy on the SDPA calls the per-example attention makes
    calls: list[tuple[int, bool, bool]] = []
    real, choose_kernel = packed_attention.sdpa_attention_forward, packed_attention.varlen_kernel

    def spy(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
        calls.append((query.shape[2], mask is None, kwargs.get("is_causal") is True))
        return real(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(packed_attention, "sdpa_attention_forward", spy)

    # when a packed batch goes through both models
    expected_loss, expected_grads = _loss_and_grads(sdpa, packed)
    calls.clear()
    loss, grads = _loss_and_grads(varlen, packed)

    # then the results agree, and every call was one example, unmasked and causal
    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=RTOL)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=RTOL, msg=name)
    segments = packed_attention.example_segments(packed["position_ids"])
    assert segments is not None
    assert len(calls) == layers * sum(len(row) for row in segments) and len(calls) >= layers * len(examples)
    assert all(unmasked and causal for _, unmasked, causal in calls)
    assert max(length for length, _, _ in calls) <= max(len(e.input_ids) for e in examples)

    # given a padded evaluation batch (left padding, so a missing mask would change the logits)
    tokenizer.padding_side = "left"
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)(
        [e.features() for e in examples]
    )
    assert not bool(padded["attention_mask"].all())
    calls.clear()
    with torch.no_grad():
        # then it is SDPA's result with the mask: one masked call per layer
        torch.testing.assert_close(varlen(**padded).logits, sdpa(**padded).logits, atol=ATOL, rtol=RTOL)
    assert len(calls) == layers and not any(unmasked for _, unmasked, _ in calls)

    # (and positions that restart but not at 0, as generation gives left padding, are not a packed batch)
    assert packed_attention.example_segments(torch.tensor([[1, 1, 0, 1, 2]])) is None
    assert packed_attention.example_segments(torch.tensor([[0, 1, 0, 1, 2]])) == [[(0, 2), (2, 5)]]
    assert packed_attention.example_segments(torch.tensor([[0, 1, 2, 3]])) is None

    # given PyTorch's varlen kernel (each signature), when the packed batch goes through it
    for new_signature in (True, False):
        kernel = _reference_varlen(new_signature)
        monkeypatch.setattr(
            packed_attention, "varlen_kernel", lambda query, dropout, scaling, kernel=kernel: kernel
        )
        calls.clear()
        kernel_loss, kernel_grads = _loss_and_grads(varlen, packed)
        # then the per-example SDPA loop was not used, and the results are the same
        assert not calls
        torch.testing.assert_close(kernel_loss, expected_loss, atol=ATOL, rtol=RTOL)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(kernel_grads[name], grad, atol=ATOL, rtol=RTOL, msg=name)

    # and PyTorch's kernel is only chosen for CUDA half-precision inputs without dropout
    assert choose_kernel(torch.zeros(1, dtype=torch.bfloat16), 0.0) is None  # a CPU tensor
    assert choose_kernel(torch.zeros(1), 0.0) is None
    # (on CUDA: not for fp32, dropout, or a softmax scale torch 2.10's kernel cannot take)
    cuda = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    old = _reference_varlen(new_signature=False)
    monkeypatch.setattr(packed_attention, "_torch_varlen", lambda: old)
    assert choose_kernel(cuda, 0.0) is old and choose_kernel(cuda, 0.0, 0.125) is old
    assert choose_kernel(cuda, 0.1) is None and choose_kernel(cuda.float(), 0.0) is None
    assert choose_kernel(cuda, 0.0, 0.5) is None
    new = _reference_varlen(new_signature=True)
    monkeypatch.setattr(packed_attention, "_torch_varlen", lambda: new)
    assert choose_kernel(cuda, 0.0, 0.5) is new


def test_attention_auto_and_sdpa_varlen_choose_by_device_packing_and_window(
    studio_settings: Path, tiny_lm: Path
) -> None:
    """``auto`` switches packed training to ``sdpa_varlen`` on CPU workers only; asking for it explicitly works on
    any device, is a note without packing, and a clear error where the model's sliding window is shorter than
    ``max_length`` (per-example attention would drop the window) or its attention is not SDPA."""
    from transformers import AutoConfig

    from worker.recipes import causal_lm

    base = {
        "task": "causal-lm",
        "base_model": str(tiny_lm),
        "dataset_id": 1,
        "training": {"max_length": MAX_LENGTH},
    }

    def spec(attention: str = "auto", packing: str = "auto") -> JobSpec:
        return JobSpec.model_validate(
            {
                **base,
                "training": {**base["training"], "attention": attention},
                "causal_lm": {"packing": packing},
            }
        )

    class Model:
        def __init__(self, **config: Any) -> None:
            self.config = AutoConfig.from_pretrained(str(tiny_lm))
            self.config._attn_implementation = "sdpa"
            for key, value in config.items():
                setattr(self.config, key, value)

    choose = causal_lm.attention_choice
    # auto: on a CPU worker for packed rows (on and rows), never unpacked, never on a GPU (not measured there)
    assert choose(spec(), Model(), "on", gpu=False)[0] and choose(spec(), Model(), "rows", gpu=False)[0]
    assert choose(spec(), Model(), "off", gpu=False) == (False, None)
    assert choose(spec(), Model(), "rows", gpu=True) == (False, None)
    # nor under torch.compile (the host-side boundaries would break the graph at every layer)
    compiled = spec().model_copy(
        update={"training": spec().training.model_copy(update={"torch_compile": True})}
    )
    assert choose(compiled, Model(), "on", gpu=False) == (False, None)
    # explicit: on a GPU too; without packing it says why it changes nothing
    switched, note = choose(spec("sdpa_varlen"), Model(), "rows", gpu=True)
    assert switched and note is not None and note.startswith("attention sdpa_varlen,")
    assert choose(spec("sdpa_varlen"), Model(), "off", gpu=False) == (
        False,
        "attention sdpa_varlen: no packed rows (packing off), so plain SDPA",
    )
    # a sliding window shorter than max_length: auto keeps SDPA's mask, explicit is refused; a long one is fine
    short = Model(sliding_window=MAX_LENGTH // 2)
    assert choose(spec(), short, "on", gpu=False) == (False, None)
    with pytest.raises(ValueError, match=r"sliding window \(80 tokens\) is shorter than max_length 160"):
        choose(spec("sdpa_varlen"), short, "on", gpu=False)
    assert choose(spec(), Model(sliding_window=4096), "on", gpu=False)[0]
    assert choose(spec(), Model(sliding_window=16, use_sliding_window=False), "on", gpu=False)[0]
    # other attention implementations are not switched (eager, flex_attention: what was asked stays)
    eager = Model(_attn_implementation="eager")
    assert choose(spec("eager"), eager, "on", gpu=False) == (False, None)
    assert choose(spec(), eager, "on", gpu=False) == (False, None)
    with pytest.raises(ValueError, match="attention is eager, not sdpa"):
        choose(spec("sdpa_varlen"), eager, "on", gpu=False)

    # and a padding-free row holds: the whole batch under flash varlen (no mask), up to 2,048 tokens under
    # sdpa_varlen (transformers still builds its row × row mask beside it), max_length under a dense mask
    rows = causal_lm.padding_free_row_tokens
    assert rows(Model(_attn_implementation="flash_attention_2"), MAX_LENGTH) is None
    assert rows(Model(_attn_implementation="sdpa_varlen"), MAX_LENGTH) == 2048
    assert rows(Model(_attn_implementation="sdpa_varlen"), 4096) == 4096
    assert rows(Model(), MAX_LENGTH) == rows(eager, MAX_LENGTH) == MAX_LENGTH
