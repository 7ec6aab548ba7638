"""The task registry: tasks are discovered modules, their names are defined once, and every task has a recipe."""

import ast
import sys
from pathlib import Path
from typing import get_args

import pytest

from app.core.spec import JobSpec
from app.core.tasks import CAUSAL_LM, CLASSIFICATION, PREFERENCE, discover, get_task, registry, task_names

ROOT = Path(__file__).resolve().parent.parent
# Files another part of issue 16 still has to move onto the constants (app/web, app/http: the web helper; the
# REST client talks HTTP only and imports nothing of app/core; worker/engine.py splits separately). No new ones.
# The command-line client talks to the REST API only and imports nothing of the server (app/client/).
PENDING_RAW_TASK_NAMES = frozenset({"app/client/cli.py"})


def test_the_builtin_tasks_are_registered_in_form_order() -> None:
    assert task_names() == (CLASSIFICATION, CAUSAL_LM, PREFERENCE)
    assert get_task(CAUSAL_LM).generates_text and not get_task(CLASSIFICATION).generates_text
    assert get_task(PREFERENCE).generates_text


def test_the_spec_offers_exactly_the_registered_tasks() -> None:
    schema = JobSpec.model_json_schema()["properties"]["task"]
    assert tuple(schema["enum"]) == task_names() and schema["default"] == CLASSIFICATION
    assert get_args(JobSpec.model_fields["task"].annotation) == task_names()


def test_a_task_module_in_a_package_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # given a package with one task module, a helper module and a module without a TASK
    package = tmp_path / "extra_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_shared.py").write_text("RAISE = 1 / 0\n")
    (package / "notes.py").write_text("X = 1\n")
    (package / "summarise.py").write_text(
        "from app.core.tasks import TaskInfo\n"
        "TASK = TaskInfo(name='summarisation', label='Summarisation', formats=('prompt-completion',),\n"
        "    metrics=('rouge', 'loss'), primary_metric='rouge', higher_is_better=True,\n"
        "    headline_metrics=(('rouge', 'ROUGE'),), best_metric='loss', generates_text=True,\n"
        "    validate='app.services.causal_lm:validate_causal_lm_spec')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # when the package is scanned
    found = discover("extra_tasks", [str(package)])
    # then its task is there, by name, and nothing else
    assert list(found) == ["summarisation"] and found["summarisation"].primary_metric == "rouge"
    for name in [m for m in sys.modules if m == "extra_tasks" or m.startswith("extra_tasks.")]:
        sys.modules.pop(name)


def test_every_task_has_a_recipe_and_a_spec_check() -> None:
    from app.core.tasks import spec_validator
    from worker.recipes import recipes

    assert set(recipes()) == set(registry())
    for name in registry():
        assert callable(spec_validator(name))


def _raw_task_names(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set(task_names())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]


def test_task_names_are_written_once() -> None:
    # the task names as string literals, anywhere in app/ and worker/ but the registry's own module
    found = {
        str(path.relative_to(ROOT)): lines
        for package in ("app", "worker")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "app/core/tasks.py" and (lines := _raw_task_names(path))
    }
    new = {path: lines for path, lines in found.items() if path not in PENDING_RAW_TASK_NAMES}
    assert not new, f"use the constants of app/core/tasks.py (or the registry) instead of task names: {new}"


def test_method_needs_are_registry_fields() -> None:
    from worker.methods import registry as methods

    assert {name for name, info in methods().items() if info.virtual_tokens} == {
        "prefix",
        "prompt",
        "ptuning",
    }
    assert {name for name, info in methods().items() if info.quantized} == {"qlora"}
