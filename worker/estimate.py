"""Before launch: exact parameter counts and an estimate of training memory for a job spec.

The counts are exact because they come from the real thing: the base model is built from its config on the
meta device (shapes only; no weights are read or allocated) and the job's method is applied to it by the same
``build`` function the worker runs. Quantization (QLoRA) only changes how weights are stored, not how many
there are, so the meta model stays unquantized and the memory estimate accounts for the packed bytes.

The web app imports this module lazily, inside the request, and runs it in a thread: torch, transformers and
peft are loaded on first use, never at start-up.
"""

import math
from typing import Any

from pydantic import BaseModel

from app.core.autoconfig import needs_resolution, resolve_training, rule_inputs_for
from app.core.base_models import ResolvedModel, resolve_base_model
from app.core.errors import InvalidSpec
from app.core.safety import remote_code_allowed
from app.core.spec import JobSpec
from app.core.tasks import CAUSAL_LM, CLASSIFICATION, PREFERENCE
from worker.methods import BuildContext, MethodInfo, count_parameters, get_method

FP32 = 4
ADAM_STATES = 2  # AdamW keeps two fp32 moments per trainable parameter


def label_count(spec: JobSpec, profile: dict[str, Any] | None) -> int | None:
    """Classes of a classification job, from the dataset profile (value counts of the label column)."""
    if spec.task != CLASSIFICATION:
        return None
    column = ((profile or {}).get("columns") or {}).get(spec.label_column) or {}
    counts = column.get("value_counts")
    if not counts:
        raise ValueError(f"the dataset profile has no label counts for column {spec.label_column!r}")
    return len(counts)


def training_examples(spec: JobSpec, profile: dict[str, Any] | None) -> int | None:
    """Training rows after the held-out validation split (None when the profile does not say)."""
    rows = (profile or {}).get("rows")
    if not isinstance(rows, int):
        return None
    if spec.validation_dataset_id is None and spec.validation_fraction > 0:
        rows -= round(rows * spec.validation_fraction)
    return max(rows, 0)


def planned_steps(spec: JobSpec, examples: int | None) -> int | None:
    """Optimizer steps the job will run (as the engine and Trainer count them)."""
    training = spec.training
    if training.max_steps or examples is None:
        return training.max_steps
    epochs = float(training.num_epochs) if isinstance(training.num_epochs, int | float) else 1.0
    return max(1, math.ceil(epochs * max(1, math.ceil(examples / training.batch_size))))


def meta_model(base: ResolvedModel, task: str, num_labels: int | None) -> Any:
    """The base model for a task built from its config on the meta device: all shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    trust = remote_code_allowed(base.model_id)  # only allow-listed models run their own code
    if task == CLASSIFICATION:
        config = AutoConfig.from_pretrained(
            str(base.path), num_labels=num_labels or 2, trust_remote_code=trust
        )
        auto: Any = AutoModelForSequenceClassification
    elif task in (CAUSAL_LM, PREFERENCE):
        config = AutoConfig.from_pretrained(str(base.path), trust_remote_code=trust)
        auto = AutoModelForCausalLM
    else:
        raise ValueError(f"no estimate for task {task!r}")
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust)


def _bytes_per_element(dtype: Any) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else FP32


def weight_bytes(model: Any, load_kwargs: dict[str, Any]) -> int:
    """Bytes the base model's weights take once loaded, counting bitsandbytes' packed 4-/8-bit storage."""
    from torch import nn

    quantization = load_kwargs.get("quantization_config")
    bits = (
        4
        if getattr(quantization, "load_in_4bit", False)
        else 8
        if getattr(quantization, "load_in_8bit", False)
        else 0
    )
    skipped = list(getattr(quantization, "llm_int8_skip_modules", None) or [])
    quantized: set[int] = set()
    if bits:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not any(skip in name for skip in skipped):
                quantized.add(id(module.weight))
    if bits == 4:
        # 4 bits per weight plus one fp32 absmax per 64-weight block, or with double quantization one byte
        # per block and one fp32 constant per 256 blocks.
        double = getattr(quantization, "bnb_4bit_use_double_quant", False)
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if double else 4 / 64)
    else:
        per_weight = 1.0  # int8 weights (plus one fp32 scale per row, counted below)
    total = 0.0
    for param in model.parameters():
        if id(param) in quantized:
            total += param.numel() * per_weight + (param.shape[0] * FP32 if bits == 8 else 0)
        else:
            total += param.numel() * _bytes_per_element(param.dtype)
    return int(total)


def _backprop_layers(model: Any) -> int:
    """How many transformer layers the backward pass runs through (and so keep activations for)."""
    from worker.methods._common import split_by_layer

    config = getattr(model, "active_peft_config", None)
    before, per_layer, _ = split_by_layer(model)
    if getattr(config, "is_prompt_learning", False) or any(p.requires_grad for _, p in before):
        return len(per_layer)
    for index, layer in enumerate(per_layer):
        if any(p.requires_grad for _, p in layer):
            return len(per_layer) - index
    return 0


def activation_bytes(model: Any, task: str, batch: int, length: int, checkpointing: bool) -> int:
    """Activations kept for the backward pass, in fp32, at the full max length (dynamic padding makes real
    batches shorter). Per layer: ~8 hidden-sized and 2 FFN-sized tensors per token, plus the attention
    scores and probabilities (2 per head and token pair); with gradient checkpointing, one layer input per
    layer plus one layer's worth. Causal LMs add the logits over the vocabulary and their gradient."""
    config = model.config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    ffn = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * hidden)
    layers = _backprop_layers(model)
    per_layer = batch * length * (8 * hidden + 2 * ffn) + 2 * heads * length * length * batch
    if checkpointing and layers:
        elements = layers * batch * length * hidden + per_layer
    else:
        elements = layers * per_layer
    if task in (CAUSAL_LM, PREFERENCE):
        elements += 2 * batch * length * int(getattr(config, "vocab_size", 0) or 0)
    return int(elements * FP32)


class MemoryEstimate(BaseModel):
    """Training memory in bytes, by kind."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total_bytes: int


class JobEstimate(BaseModel):
    """What a job will train and roughly how much memory it needs."""

    method: str
    task: str
    base_model: str
    num_labels: int | None
    total_steps: int | None
    trainable_params: int
    total_params: int
    trainable_percent: float
    memory: MemoryEstimate
    assumptions: list[str]


def estimate(
    base_model: str,
    task: str,
    method: MethodInfo,
    settings: BaseModel,
    *,
    num_labels: int | None,
    batch_size: int,
    max_length: int,
    learning_rate: float = 5e-4,
    total_steps: int | None = None,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw_torch",
    reference_copy: bool = False,
) -> JobEstimate:
    """Build the method on a meta-device base model: exact parameter counts and a memory estimate.

    Preference tuning runs two sequences per example (chosen and rejected, or KTO's answer and its KL partner),
    so activations count twice the batch; ``reference_copy`` adds the frozen reference model a method that
    changes the base's own weights loads (full fine-tuning), and its activations are not kept (no gradient)."""
    base = resolve_base_model(base_model)
    context = BuildContext(
        task=task,
        num_labels=num_labels,
        learning_rate=learning_rate,
        total_steps=total_steps,
        base_model_path=str(base.path),
    )
    load_kwargs = method.load_kwargs(settings, context)
    model = meta_model(base, task, num_labels)
    base_bytes = weight_bytes(model, load_kwargs)
    base_total = sum(p.numel() for p in model.parameters())
    built = method.build(model, settings, context).model
    trainable, total = count_parameters(built)
    # Parameters the method adds (adapters, prompts) are fp32.
    weights = base_bytes + max(0, total - base_total) * FP32
    # The job's training.gradient_checkpointing, or QLoRA's own method setting.
    checkpointing = gradient_checkpointing or bool(getattr(settings, "gradient_checkpointing", False))
    # bitsandbytes' 8-bit AdamW keeps each moment in one byte (plus small per-block scales, left out).
    state_bytes = 1 if optimizer in ("adamw_8bit", "paged_adamw_8bit") else FP32
    sequences = batch_size * (2 if task == PREFERENCE else 1)
    activations = activation_bytes(built, task, sequences, max_length, checkpointing)
    assumptions: list[str] = []
    if task == PREFERENCE:
        assumptions.append(
            "preference tuning: two sequences per example (chosen and rejected), so activations for "
            f"{sequences} sequences"
        )
        if reference_copy:
            weights += base_bytes
            assumptions.append(
                f"a frozen reference copy of the base model ({base_bytes / 10**9:.2f} GB) is loaded: this method "
                "changes the base's own weights, so they cannot be switched off"
            )
    memory = MemoryEstimate(
        weights_bytes=weights,
        gradients_bytes=trainable * FP32,
        optimizer_bytes=trainable * state_bytes * ADAM_STATES,
        activations_bytes=activations,
        total_bytes=weights + trainable * (FP32 + state_bytes * ADAM_STATES) + activations,
    )
    return JobEstimate(
        method=method.name,
        task=task,
        base_model=base_model,
        num_labels=num_labels,
        total_steps=total_steps,
        trainable_params=trainable,
        total_params=total,
        trainable_percent=round(100.0 * trainable / total, 4) if total else 0.0,
        memory=memory,
        assumptions=[
            "parameter counts are exact: the method is applied to the base model built on the meta device",
            f"activations at the full max length ({max_length} tokens) for batch {batch_size}, fp32; dynamic "
            "padding makes most batches shorter",
            "AdamW: two fp32 moments per trainable parameter, fp32 gradients",
            "excludes the framework itself (on a CPU worker, ~0.5–1 GB of process memory for torch and "
            "transformers)",
            *assumptions,
        ],
    )


def estimate_job(spec: JobSpec, profile: dict[str, Any] | None) -> JobEstimate:
    """The estimate for a job spec; label count and dataset size come from the training set's profile."""
    method = get_method(spec.method)
    examples = training_examples(spec, profile)
    if needs_resolution(spec.training):  # auto settings: the same rule the job will run with
        inputs = rule_inputs_for(spec, examples or 0, 0)
        spec = spec.model_copy(update={"training": resolve_training(spec.training, inputs).training})
    # KTO learns from single answers: a pair gives two (its chosen one good, its rejected one bad), so twice the steps
    kto_on_pairs = (
        spec.task == PREFERENCE and spec.preference.loss == "kto" and spec.preference.format == "pairs"
    )
    steps = planned_steps(spec, examples * 2 if kto_on_pairs and examples is not None else examples)
    try:
        return estimate(
            spec.base_model,
            spec.task,
            method,
            spec.method_settings(),
            num_labels=label_count(spec, profile),
            batch_size=spec.training.batch_size,
            max_length=spec.training.max_length,
            learning_rate=float(spec.training.learning_rate),
            total_steps=steps,
            gradient_checkpointing=spec.training.gradient_checkpointing == "on",
            optimizer=spec.training.optimizer,
            reference_copy=spec.task == PREFERENCE
            and spec.preference.loss not in ("orpo", "simpo")
            and method.saved_as != "peft",
        )
    except ValueError as problem:
        # The method cannot be applied as configured (e.g. no such target modules in this architecture): the
        # same error the worker would hit on its first step, reported before launch.
        raise InvalidSpec(
            f"Method {spec.method!r} on {spec.base_model!r}: {problem}", field="method_config"
        ) from None


def gpu_fit(total_bytes: int) -> dict[str, Any]:
    """Fit before launch, per GPU class the studio knows (``resources.gpu_class``): the peak memory a training
    process needs on a GPU (the estimate with the same headroom and CUDA overhead ``suggest_gpu_class`` uses),
    whether each class holds it, and one line in words ("fits on a 16 GB GPU", "needs 40 GB", "CPU only")."""
    from app.core.queue import GPU_HEADROOM, GPU_OVERHEAD_BYTES
    from app.core.spec import GPU_CLASS_BYTES

    needed = int(total_bytes * GPU_HEADROOM + GPU_OVERHEAD_BYTES)
    classes = [
        {"gpu_class": name, "memory_bytes": size, "fits": size >= needed}
        for name, size in GPU_CLASS_BYTES.items()
    ]
    fitting = [c for c in classes if c["fits"]]
    gb = needed / 10**9
    if not fitting:
        summary = f"CPU only (no GPU class fits: it needs about {gb:.0f} GB)"
    else:
        smallest = str(fitting[0]["gpu_class"]).removesuffix("gb")
        if fitting[0] is classes[0]:
            summary = f"fits on a {smallest} GB GPU"
        else:
            summary = f"needs {smallest} GB (about {gb:.0f} GB: too much for a {str(classes[0]['gpu_class']).removesuffix('gb')} GB GPU)"
    return {"peak_bytes": needed, "classes": classes, "summary": summary}
