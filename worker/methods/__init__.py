"""The registry of fine-tuning methods, discovered from the modules in this package.

Each module defines ``METHOD = MethodInfo(...)``: its name, a typed pydantic config (whose field
descriptions the job form shows as help texts) and a ``build`` function that turns a base model into a
trainable one. Modules import torch/peft only inside ``build``, so the web app can read the registry
without loading them.
"""

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class BuildContext:
    """What a method's build function may need besides the model and its config."""

    task: str
    num_labels: int | None = None
    learning_rate: float = 5e-4
    weight_decay: float = 0.0


@dataclass
class BuiltModel:
    """A trainable model, plus an optimizer when the method needs a custom one (e.g. LoRA+)."""

    model: Any
    optimizer_factory: Callable[[Any], Any] | None = None


def no_load_kwargs(config: BaseModel, context: BuildContext) -> dict[str, Any]:
    """Most methods load the base model as it is."""
    return {}


def save_with_save_pretrained(model: Any, folder: str) -> None:
    """Save through the model's own ``save_pretrained`` (peft models write only the adapter)."""
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
    """

    name: str
    title: str
    summary: str
    config: type[BaseModel]
    build: Callable[[Any, BaseModel, BuildContext], BuiltModel]
    tasks: tuple[str, ...] = ("sequence-classification", "causal-lm")
    load_kwargs: Callable[[BaseModel, BuildContext], dict[str, Any]] = no_load_kwargs
    save: Callable[[Any, str], None] = save_with_save_pretrained
    load: Callable[[Any, str, str], Any] = load_peft_adapter
    extra: dict[str, Any] = field(default_factory=dict)


@lru_cache
def registry() -> dict[str, MethodInfo]:
    """All methods found in this package, by name."""
    found: dict[str, MethodInfo] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        info = getattr(module, "METHOD", None)
        if isinstance(info, MethodInfo):
            found[info.name] = info
    return found


def get_method(name: str) -> MethodInfo:
    """The method registered under ``name``; KeyError if there is none."""
    return registry()[name]
