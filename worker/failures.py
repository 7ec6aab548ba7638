"""Turn the exception that stopped a job into an explanation a person can act on.

The job's ``error`` gets the explanation; its event log keeps the full traceback (see ``mark_failed``).
"""

import traceback
from typing import Any

from worker.methods import registry


class NonFiniteLoss(Exception):
    """Training stopped because the loss became NaN or infinite."""

    def __init__(self, step: int, value: float, learning_rate: float | None = None) -> None:
        self.step = step
        self.value = value
        self.learning_rate = learning_rate
        super().__init__(f"the training loss became {value} at step {step}")


class TargetModulesNotFound(Exception):
    """The method's target modules match no module of the base model."""

    def __init__(self, message: str, available: list[str]) -> None:
        self.available = available
        super().__init__(message)


class DatasetProblem(Exception):
    """The job's data could not be read or turned into training examples."""


class ModelProblem(Exception):
    """The base model could not be found or loaded."""


MAX_MESSAGE = 2000
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
_MODEL_FRAMES = ("from_pretrained", "resolve_base_model", "cached_file", "load_state_dict")
_DATA_FRAMES = ("_load_datasets", "classification_data", "causal_lm_data", "read_rows", "tokenize")


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < MAX_MESSAGE else text[:MAX_MESSAGE] + " …"


def _frames(exc: BaseException) -> list[str]:
    """Function names and files of the traceback, innermost last."""
    return [f"{frame.filename}:{frame.name}" for frame in traceback.extract_tb(exc.__traceback__)]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out-of-memory errors, and CPU allocation failures."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is always there in the worker
        pass
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def oom_hint(spec: Any | None) -> str:
    """Concrete settings to lower, from the job's own spec when known."""
    if spec is None:
        return (
            "Lower training.batch_size or training.max_length, or use a method that trains fewer weights "
            "(LoRA, or QLoRA which loads the base model in 4 bits)."
        )
    training = spec.training
    smaller = max(1, training.batch_size // 2)
    shorter = max(8, training.max_length // 2)
    hints = [
        f"lower training.batch_size (now {training.batch_size}, try {smaller}; gradient accumulation keeps the "
        "effective batch)",
        f"or training.max_length (now {training.max_length}, try {shorter})",
        "use gradient checkpointing",
    ]
    method = registry().get(spec.method)
    if method is None or not method.quantized:
        hints.append("or QLoRA, which loads the base model in 4 bits")
    return "Try: " + ", ".join(hints) + "."


def module_names(model: Any, limit: int = 40) -> list[str]:
    """Distinct last names of the model's Linear-like layers (what target_modules may name)."""
    names: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not leaf or leaf.isdigit() or leaf in names:
            continue
        if type(module).__name__ in ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt", "Embedding"):
            names.append(leaf)
    return names[:limit]


def explain(exc: BaseException, spec: Any | None = None) -> str:
    """One readable paragraph: what went wrong and what to change."""
    if isinstance(exc, NonFiniteLoss):
        lr = f" (learning rate {exc.learning_rate:g})" if exc.learning_rate else ""
        return (
            f"Training stopped early: the loss became {exc.value} at step {exc.step}{lr}. Lower "
            "training.learning_rate (e.g. by 10×), add warmup (training.warmup_ratio), or check the data for "
            "empty or extreme examples. The checkpoints saved before that step are kept."
        )
    if is_out_of_memory(exc):
        return f"Out of memory while training ({_short(exc).splitlines()[0]}). {oom_hint(spec)}"
    if isinstance(exc, TargetModulesNotFound):
        available = ", ".join(exc.available) or "none found"
        return (
            f"The method's target modules are not in the base model: {_short(exc)} The model's layers that "
            f"can be targeted are: {available}. Set method_config.target_modules to some of them."
        )
    if isinstance(exc, DatasetProblem):
        return f"The dataset could not be used: {_short(exc)}"
    if isinstance(exc, ModelProblem):
        return f"The base model could not be loaded: {_short(exc)}"
    frames = _frames(exc)
    text = _short(exc)
    if "Target modules" in text and "not found" in text:
        return (
            f"The method's target modules are not in the base model: {text} Set method_config.target_modules "
            "to layers the model has (GET /api/v1/methods describes the defaults)."
        )
    if any(marker in frame for frame in frames for marker in _MODEL_FRAMES):
        return (
            f"The base model could not be loaded: {text.rstrip('.')}. Check that it is a local folder with a transformers "
            "model (config.json and weights) or a hub id already in the cache, and that the files are complete."
        )
    if any(marker in frame for frame in frames for marker in _DATA_FRAMES):
        return (
            f"The dataset could not be used: {type(exc).__name__}: {text}. Check the columns named in the job "
            "and the file's rows; upload a corrected file and retry."
        )
    return f"{type(exc).__name__}: {text}"
