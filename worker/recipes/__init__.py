"""Task recipes: how a task turns a spec and its datasets into a model, training data and metrics.

The engine is task-agnostic; each task (sequence classification, causal LM) is one module here with a
``RECIPE`` keyed by the task's name, found by ``pkgutil`` like the methods; its declarative side (name, metrics,
spec check) is one module under ``app/core/task_defs/``. Modules without a ``RECIPE`` (the ``*_data`` helpers)
and modules whose name starts with ``_`` are not recipes.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from app.core.base_models import ResolvedModel
from app.core.discovery import discover
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
    notes: list[str] = field(default_factory=list)  # choices made on the job's behalf: "config" events
    # A task whose loss is not the model's own (preference tuning: trl's trainers) names its Trainer class, the
    # TrainingArguments subclass it takes with the task's settings, and extra Trainer keyword arguments.
    trainer_class: Any = None
    args_class: Any = None
    args_extra: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    # Called with the Trainer once it is built (before training), e.g. to drop what the task does not need.
    after_trainer: Callable[[Any], None] | None = None
    # The recipe already made the model trainable (it continues a saved adapter): the method is not applied again.
    trainable: bool = False


@dataclass(frozen=True)
class Recipe:
    """A task: prepare training, and load a base model for inference from an adapter's studio.json."""

    task: str
    prepare: Callable[[JobSpec, ResolvedModel, Dataset, Dataset | None, dict[str, Any]], Prepared]
    load_base: Callable[[ResolvedModel, dict[str, Any], dict[str, Any]], Any]


@lru_cache
def recipes() -> dict[str, Recipe]:
    """Every recipe found in this package, by task name."""
    return discover(__name__, __path__, ("RECIPE",), Recipe, lambda recipe: recipe.task, "recipes")


def get_recipe(task: str) -> Recipe:
    """The recipe for a task; KeyError if there is none."""
    return recipes()[task]
