"""Causal-LM instruction tuning: prompts and responses in, loss on responses, loss/perplexity/accuracy out."""

import math
import sys
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForSeq2Seq, EvalPrediction

from app.core.base_models import ResolvedModel
from app.core.models import Dataset
from app.core.safety import model_load_kwargs, remote_code_allowed
from app.core.spec import JobSpec
from app.core.tasks import CAUSAL_LM
from worker import packed_attention
from worker.methods import get_method
from worker.recipes import Prepared, Recipe
from worker.recipes.causal_lm_data import (
    IGNORE,
    PackedCollator,
    PaddingFreeCollator,
    causal_data,
    job_encoder,
    load_tokenizer,
    pack,
)
from worker.recipes.classification import without_dropout

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def honours_packed_positions(model: Any) -> bool:
    """True when the model keeps packed examples apart from their position ids alone (no attention mask).

    Models whose mask comes from transformers' ``create_causal_mask`` turn restarting position ids into a
    block-diagonal mask (SDPA, eager) and flash-attention into varlen sequences; older code ignores them, and
    packed examples would attend to each other there.
    """
    if getattr(model.config, "_attn_implementation", None) in VARLEN_ATTENTION:
        return True
    base = getattr(model, "base_model", model)  # the decoder under the LM head
    return any(
        hasattr(sys.modules.get(type(part).__module__), "create_causal_mask") for part in (model, base)
    )


def trains_on_gpu() -> bool:
    """True on a worker whose Trainer runs on a CUDA GPU (training_arguments: use_cpu otherwise)."""
    return torch.cuda.is_available()


def packing_mode(spec: JobSpec, model: Any, gpu: bool | None = None) -> tuple[str, str | None]:
    """The packing a job trains with (on, rows, off) and, when auto chose, what and why (for the job's events).

    ``auto`` is ``on`` (padding-free: a step is exactly the unpacked batch) on a CPU, and ``rows`` on a GPU
    (``gpu``, default: this worker's), where a step of ``batch_size`` examples leaves it mostly idle: measured on
    an H200, a tenth of a packed script's tokens/s (docs/performance.md).
    """
    choice = spec.causal_lm.packing
    supported = honours_packed_positions(model)
    if choice in ("on", "rows") and not supported:
        raise ValueError(
            f"causal_lm.packing {choice}: this model's architecture ({type(model).__name__}) does not keep "
            "packed examples apart by their position ids, so they would attend to each other; set packing "
            "to off or auto"
        )
    if choice != "auto":
        return choice, None
    if get_method(spec.method).virtual_tokens:
        return (
            "off",
            f"packing auto: off, method {spec.method} adds virtual tokens every example needs its own",
        )
    if not supported:
        return "off", (
            f"packing auto: off, {type(model).__name__} does not keep packed examples apart by position ids"
        )
    if trains_on_gpu() if gpu is None else gpu:
        return "rows", (
            f"packing auto: rows on a GPU (a step packs batch_size {spec.training.batch_size} rows of up to "
            f"max_length {spec.training.max_length} tokens; a step of {spec.training.batch_size} examples would "
            "leave the GPU mostly idle)"
        )
    return "on", None


# Rows of a padding-free batch under sdpa_varlen: attention is per example, but transformers still builds a
# row × row mask beside it (the fallback's), so rows are capped where that stays cheap.
PER_EXAMPLE_ROW_TOKENS = 2048


def padding_free_row_tokens(model: Any, max_length: int) -> int | None:
    """How many tokens a padding-free row holds: the whole batch under flash-attention varlen (no mask at all), up
    to 2,048 (or ``max_length``) under per-example SDPA, ``max_length`` under a dense row-wide mask."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation in VARLEN_ATTENTION:
        return None
    if implementation == packed_attention.NAME:
        return max(max_length, PER_EXAMPLE_ROW_TOKENS)
    return max_length


def attention_choice(
    spec: JobSpec, model: Any, packing: str, gpu: bool | None = None
) -> tuple[bool, str | None]:
    """Whether packed training switches the model to per-example SDPA (``sdpa_varlen``), and the note saying so.

    ``auto`` switches on a CPU worker (measured there: docs/benchmarks.md) unless the model is compiled, and keeps
    SDPA's masked kernel on a GPU, where it is not measured yet; ``sdpa_varlen`` asks for it anywhere. Only SDPA
    models are switched (it is SDPA's arithmetic), only when rows are packed, and not when the model's sliding
    window is shorter than ``max_length`` (the window would no longer hold inside an example).
    """
    choice = spec.training.attention
    if choice not in ("auto", packed_attention.NAME) or packing == "off":
        if choice == packed_attention.NAME:
            return False, f"attention {choice}: no packed rows (packing off), so plain SDPA"
        return False, None
    implementation = getattr(model.config, "_attn_implementation", None)
    window = getattr(model.config, "sliding_window", None)
    if getattr(model.config, "use_sliding_window", True) is False:
        window = None
    why_not = None
    if implementation not in packed_attention.REPLACES:
        why_not = f"the model's attention is {implementation}, not sdpa"
    elif window and window < spec.training.max_length:
        why_not = (
            f"its sliding window ({window} tokens) is shorter than max_length {spec.training.max_length}"
        )
    if why_not:
        if choice == packed_attention.NAME:
            raise ValueError(f"training.attention {choice}: {why_not}; choose auto")
        return False, None
    # auto: not on a GPU (unmeasured there), nor compiled (host-side boundaries would break the graph per layer)
    if choice == "auto" and ((trains_on_gpu() if gpu is None else gpu) or spec.training.torch_compile):
        return False, None
    return True, (
        f"attention {'auto: ' if choice == 'auto' else ''}{packed_attention.NAME}, each packed example attends "
        "within itself (no block-diagonal mask over the row)"
    )


def preprocess_logits(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Keep only what the metrics need: argmax ids (aligned with labels) and each row's summed NLL.

    ``predicted[:, t]`` is the model's guess for token t (made at position t-1), -100 at position 0.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    # Prompt tuning and P-tuning put their virtual tokens' logits in front: keep the real tokens' positions.
    logits = logits[:, -labels.shape[1] :, :]
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    predicted = torch.full_like(labels, IGNORE)
    predicted[:, 1:] = shifted_logits.argmax(dim=-1)
    mask = shifted_labels != IGNORE
    nll = torch.nn.functional.cross_entropy(
        shifted_logits.transpose(1, 2), shifted_labels.clamp(min=0), reduction="none"
    )
    return predicted, (nll * mask).sum(dim=-1)


def causal_lm_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Token accuracy and perplexity (exp of the mean NLL per response token) on the validation split."""
    outputs: Any = prediction.predictions  # (argmax ids, summed NLL per row) from preprocess_logits
    predicted, nll = np.asarray(outputs[0]), np.asarray(outputs[1], dtype=np.float64)
    labels = np.asarray(prediction.label_ids)
    width = min(predicted.shape[1], labels.shape[1])
    predicted, labels = predicted[:, :width], labels[:, :width]
    mask = labels != IGNORE
    mask[:, 0] = False
    tokens = int(mask.sum())
    if tokens == 0:
        return {}
    mean_nll = float(nll.sum()) / tokens
    return {
        "token_accuracy": float((predicted[mask] == labels[mask]).mean()),
        "perplexity": math.exp(min(mean_nll, 50.0)),
    }


def _load_kwargs(load_kwargs: dict[str, Any], base: ResolvedModel, attention: str = "auto") -> dict[str, Any]:
    # safetensors only; trust_remote_code only for models the admin allow-listed (app/core/safety.py)
    kwargs = {**model_load_kwargs(base.model_id), **load_kwargs}
    if attention == packed_attention.NAME:
        kwargs["attn_implementation"] = "sdpa"  # switched to per-example SDPA once packing is known
    elif attention != "auto":
        kwargs["attn_implementation"] = attention
    if not torch.cuda.is_available():
        kwargs.setdefault("dtype", torch.float32)  # bf16 is ~5x slower than fp32 on this kind of CPU
    return kwargs


def prepare(
    spec: JobSpec,
    base: ResolvedModel,
    train: Dataset,
    validation: Dataset | None,
    load_kwargs: dict[str, Any],
) -> Prepared:
    """Render, tokenize and mask once (no padding), maybe pack; load the base model without a KV cache."""
    tokenizer = load_tokenizer(str(base.path))
    encoder, template_name = job_encoder(spec, tokenizer)
    data = causal_data(spec, train, validation, encoder)
    config = AutoConfig.from_pretrained(str(base.path), trust_remote_code=remote_code_allowed(base.model_id))
    if spec.training.disable_dropout:
        config = without_dropout(config)
    # No KV cache while training: it is not needed, and with it transformers ignores packed position ids.
    config.use_cache = False
    model = AutoModelForCausalLM.from_pretrained(
        str(base.path), config=config, **_load_kwargs(load_kwargs, base, spec.training.attention)
    )
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    train_dataset: list[dict[str, Any]]
    packing, why_not = packing_mode(spec, model)
    notes = [why_not] if why_not else []
    per_example, attention_note = attention_choice(spec, model, packing)
    if per_example:
        model.set_attn_implementation(packed_attention.register())
    if attention_note:
        notes.append(attention_note)
    if packing == "rows":
        train_dataset = pack(data.train, spec.training.max_length)
        collator: Any = _TrainOrEvalCollator(PackedCollator(tokenizer.pad_token_id), padded)
    elif packing == "on":
        train_dataset = [example.packable() for example in data.train]
        row_tokens = padding_free_row_tokens(model, spec.training.max_length)
        collator = _TrainOrEvalCollator(PaddingFreeCollator(tokenizer.pad_token_id, row_tokens), padded)
    else:
        train_dataset = [example.features() for example in data.train]
        collator = padded
    eval_dataset = [example.features() for example in data.eval]
    return Prepared(
        tokenizer=tokenizer,
        model=model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        collator=collator,
        compute_metrics=causal_lm_metrics,
        preprocess_logits=preprocess_logits,
        metadata={
            "template": template_name,
            "packing": packing,
            "packing_auto": spec.causal_lm.packing == "auto",
            "data_format": spec.causal_lm.format,
            "system_prompt": spec.causal_lm.system_prompt,
            "eos_token_id": tokenizer.eos_token_id,
            "train_examples": len(data.train),
            "train_sequences": len(train_dataset),
            "eval_examples": len(data.eval),
            "truncated_examples": data.truncated,
            "dropped_examples": data.dropped,
        },
        notes=notes,
    )


class _TrainOrEvalCollator:
    """Packed training rows (with position_ids) to the packed collator, eval examples to the padding one."""

    def __init__(self, packed: PackedCollator | PaddingFreeCollator, padded: Any) -> None:
        self.packed = packed
        self.padded = padded

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "position_ids" in features[0]:
            return self.packed(features)
        return dict(self.padded(features))


def load_base(base: ResolvedModel, studio: dict[str, Any], load_kwargs: dict[str, Any]) -> Any:
    """The base model for inference (with its KV cache)."""
    return AutoModelForCausalLM.from_pretrained(str(base.path), **_load_kwargs(load_kwargs, base))


RECIPE = Recipe(task=CAUSAL_LM, prepare=prepare, load_base=load_base)
