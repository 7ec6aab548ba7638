"""Task recipes: how a task turns a spec and its datasets into a model, training data and metrics.

The engine is task-agnostic; each task (sequence classification, causal LM) is one module here with a
``RECIPE`` keyed by the task's name, found by ``pkgutil`` like the methods; its declarative side (name, metrics,
spec check) is one module under ``app/core/task_defs/``. Modules without a ``RECIPE`` (the ``*_data`` helpers)
and modules whose name starts with ``_`` are not recipes.
"""

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from app.core.base_models import ResolvedModel
from app.core.models import Dataset
from app.core.spec import JobSpec


@dataclass
class Prepared:
    """Everything the engine needs from a recipe to build a Trainer."""

    tokenizer: Any
    model: Any
    train_dataset: Any
    eval_dataset: Any
    collator: Any
    compute_metrics: Callable[[Any], dict[str, float]] | None
    labels: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    preprocess_logits: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class Recipe:
    """A task: prepare training, and load a base model for inference from an adapter's studio.json."""

    task: str
    prepare: Callable[[JobSpec, ResolvedModel, Dataset, Dataset | None, dict[str, Any]], Prepared]
    load_base: Callable[[ResolvedModel, dict[str, Any], dict[str, Any]], Any]


@lru_cache
def recipes() -> dict[str, Recipe]:
    """Every recipe found in this package, by task name."""
    found: dict[str, Recipe] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        recipe = getattr(importlib.import_module(f"{__name__}.{module_info.name}"), "RECIPE", None)
        if isinstance(recipe, Recipe):
            if recipe.task in found:
                raise RuntimeError(f"two recipes are registered for task {recipe.task!r}")
            found[recipe.task] = recipe
    return found


def get_recipe(task: str) -> Recipe:
    """The recipe for a task; KeyError if there is none."""
    return recipes()[task]
