"""Task recipes: how a task turns a spec and its datasets into a model, training data and metrics.

The engine is task-agnostic; each task (sequence classification, causal LM) is one module here with a
``RECIPE``. Adding a task touches its module and the ``Task`` literal in app/core/spec.py.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
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


def get_recipe(task: str) -> Recipe:
    """The recipe for a task."""
    from worker.recipes import classification

    recipes = {classification.RECIPE.task: classification.RECIPE}
    try:
        from worker.recipes import causal_lm  # type: ignore[attr-defined]

        recipes[causal_lm.RECIPE.task] = causal_lm.RECIPE
    except ImportError:
        pass
    return recipes[task]
