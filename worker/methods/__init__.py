"""The registry of fine-tuning methods, discovered from the modules in this package.

Each module defines ``METHOD = MethodInfo(...)`` (or ``METHODS = (...)`` for a family such as the bottleneck
adapters): its name, a typed pydantic config (whose field descriptions the job form shows as help texts) and a
``build`` function that turns a base model into a trainable one. Modules import torch/peft only inside their
functions, so the web app can read the registry without loading them. Modules whose name starts with ``_``
hold shared code and are not scanned.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel

from app.core.discovery import discover
from app.core.tasks import CAUSAL_LM, CLASSIFICATION, PREFERENCE

# How a method's output folder loads outside the studio (shown on the adapter page and in docs/methods.md).
SavedAs = Literal["peft", "transformers", "studio"]


@dataclass(frozen=True)
class BuildContext:
    """What a method's build function may need besides the model and its config.

    ``total_steps`` is the number of optimizer steps the job will run (AdaLoRA schedules its rank budget over
    it); ``base_model_path`` is the folder of the base model (prompt tuning reads its tokenizer from there).
    """

    task: str
    num_labels: int | None = None
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    total_steps: int | None = None
    base_model_path: str | None = None


@dataclass
class BuiltModel:
    """A trainable model, plus what the Trainer needs besides it.

    ``optimizer_factory`` builds a custom optimizer (LoRA+, layer-wise learning rates); ``callbacks`` are
    ``transformers.TrainerCallback`` instances the method needs during training (AdaLoRA's rank allocation).
    """

    model: Any
    optimizer_factory: Callable[[Any], Any] | None = None
    callbacks: list[Any] = field(default_factory=list)


def no_load_kwargs(config: BaseModel, context: BuildContext) -> dict[str, Any]:
    """Most methods load the base model as it is."""
    return {}


def save_with_save_pretrained(model: Any, folder: str) -> None:
    """Save through the model's own ``save_pretrained`` (peft models write only the adapter).

    Only the active adapter is written: a preference job that continues an adapter keeps a frozen copy of its
    starting weights as the reference (trl's ``ref`` adapter), which is not part of what it made.
    """
    adapters = getattr(model, "peft_config", None)
    if isinstance(adapters, dict) and len(adapters) > 1:
        model.save_pretrained(folder, selected_adapters=[model.active_adapter])
        return
    model.save_pretrained(folder)


def load_peft_adapter(base_model: Any, folder: str, adapter_name: str) -> Any:
    """Load a saved peft adapter onto a base model (the default loader for peft's methods)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, folder, adapter_name=adapter_name)


@dataclass(frozen=True)
class MethodInfo:
    """A registered fine-tuning method.

    ``load_kwargs`` adds arguments to the base model's ``from_pretrained`` (QLoRA's quantization config);
    ``save`` writes the trained model to a folder; ``load`` puts a saved adapter onto a fresh base model.
    ``saved_as`` says what that folder is: a peft adapter, a complete transformers model, or one of the
    studio's own adapters (loaded with the ``studio_adapters.py`` file saved next to it).
    ``virtual_tokens``: the method adds virtual tokens or prefix key/values to every sequence (so packed
    examples would share them); ``quantized``: it loads the base model with low-bit weights (QLoRA), so
    "use a quantized method" is no advice for its out-of-memory failures.
    ``paper`` cites the method; ``learning_rate`` is a typical peak learning rate for it (a hint for the form
    and the benchmark, not applied automatically).
    """

    name: str
    title: str
    summary: str
    config: type[BaseModel]
    build: Callable[[Any, BaseModel, BuildContext], BuiltModel]
    tasks: tuple[str, ...] = (CLASSIFICATION, CAUSAL_LM, PREFERENCE)
    load_kwargs: Callable[[BaseModel, BuildContext], dict[str, Any]] = no_load_kwargs
    save: Callable[[Any, str], None] = save_with_save_pretrained
    load: Callable[[Any, str, str], Any] = load_peft_adapter
    saved_as: SavedAs = "peft"
    virtual_tokens: bool = False
    quantized: bool = False
    paper: str = ""
    learning_rate: float = 5e-4
    extra: dict[str, Any] = field(default_factory=dict)


@lru_cache
def registry() -> dict[str, MethodInfo]:
    """All methods found in this package, by name (a module may define ``METHOD`` or a list ``METHODS``)."""
    return discover(__name__, __path__, ("METHOD", "METHODS"), MethodInfo, lambda info: info.name, "methods")


def get_method(name: str) -> MethodInfo:
    """The method registered under ``name``; KeyError if there is none."""
    return registry()[name]


def count_parameters(model: Any) -> tuple[int, int]:
    """Trainable and total parameter counts (peft's own count for peft models, which counts 4-bit weights
    by their logical size); the engine records these and the estimate reproduces them on the meta device."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
