"""The task registry's declarative side: what each task is called, takes, measures and how its spec is checked.

A task (sequence classification, causal LM, ...) is one module under ``app/core/task_defs/`` defining
``TASK = TaskInfo(...)``, found by ``pkgutil`` like the methods under ``worker/methods/``, plus its torch side,
one recipe module under ``worker/recipes/`` keyed by the same name. Nothing here imports torch, so the web
process, the job spec and the form read tasks freely. The task names are defined here once; everything else
uses these constants or the registry.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from app.core.discovery import discover as discover_entries

if TYPE_CHECKING:
    from sqlmodel import Session

    from app.core.spec import JobSpec

CLASSIFICATION = "sequence-classification"
SEQUENCE_CLASSIFICATION = CLASSIFICATION
CAUSAL_LM = "causal-lm"
PREFERENCE = "preference"

# A spec check: (session, spec, owner_id) -> None, raising InvalidSpec naming the field.
SpecValidator = Callable[["Session", "JobSpec", "int | None"], None]


@dataclass(frozen=True)
class TaskInfo:
    """A registered task.

    ``formats`` are the dataset formats it trains on (the import proposal's ``format``); ``metrics`` the eval
    metric names it logs; ``primary_metric`` (with ``higher_is_better``) decides which of two jobs is better;
    ``headline_metrics`` are (key in the final metrics, label) pairs a jobs list shows, first found wins;
    ``best_metric`` is what ``best_metric: auto`` keeps the best of. ``generates_text`` says its adapters
    generate (generate, chat, the OpenAI layer) rather than classify (predict). ``validate`` names the
    torch-free spec check, ``"module:function"`` taking (session, spec, owner_id), run before a job is queued;
    ``order`` places it in the job form and the spec's ``task`` choices.
    """

    name: str
    label: str
    formats: tuple[str, ...]
    metrics: tuple[str, ...]
    primary_metric: str
    higher_is_better: bool
    headline_metrics: tuple[tuple[str, str], ...]
    best_metric: str
    generates_text: bool
    validate: str
    order: int = 100


@lru_cache
def registry() -> dict[str, TaskInfo]:
    """All tasks found in ``app/core/task_defs/``, by name, in form order."""
    from app.core import task_defs

    return discover(task_defs.__name__, list(task_defs.__path__))


def discover(package: str, path: list[str]) -> dict[str, TaskInfo]:
    """The ``TASK`` of every module of ``package`` (modules starting with ``_`` are skipped), in form order."""
    found = discover_entries(package, path, ("TASK",), TaskInfo, lambda info: info.name, "tasks")
    return dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))


def task_names() -> tuple[str, ...]:
    """Every task's name, in form order (the spec's ``task`` choices)."""
    return tuple(registry())


def get_task(name: str) -> TaskInfo:
    """The task registered under ``name``; KeyError if there is none."""
    return registry()[name]


def find_task(name: str) -> TaskInfo | None:
    """The task registered under ``name``, or None (stored rows may name a task no longer registered)."""
    return registry().get(name)


def generating_tasks() -> tuple[str, ...]:
    """The tasks whose adapters generate text."""
    return tuple(name for name, info in registry().items() if info.generates_text)


def spec_validator(name: str) -> SpecValidator:
    """The task's spec check, imported from its ``validate`` name on first use."""
    module, _, function = get_task(name).validate.partition(":")
    validator: SpecValidator = getattr(importlib.import_module(module), function)
    return validator
