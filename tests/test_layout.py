"""The layout's rules, read from the code's own imports (docs/architecture.md draws the picture).

A small ``ast`` walk over ``app/`` and ``worker/`` builds the module-level import graph: what a module imports
when it is imported. Imports inside functions are "lazy" and tracked apart; imports under
``if TYPE_CHECKING:`` run for mypy only and are left out. The rules:

- ``app/core`` and ``app/services`` import no web framework and no torch stack at module level;
- nothing under ``app/`` imports ``worker`` at module level, and its lazy imports of ``worker`` are exactly those
  declared in ``ALLOWED_LAZY_WORKER_IMPORTS``;
- ``app/core`` sits at the bottom, ``app/services`` below ``app/api`` and ``app/web``;
- no import cycles at module level; cycles closed by a lazy import are exactly those in ``KNOWN_CYCLES``, a list
  that only shrinks.
"""

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "worker")

HEAVY = frozenset(
    {"fastapi", "starlette", "sse_starlette", "torch", "transformers", "peft", "bitsandbytes", "trl"}
)

# layer (module prefix) -> module prefixes it may not import at module level
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "app.core": (
        "app.services",
        "app.api",
        "app.web",
        "app.http",
        "app.client",
        "app.main",
        "app.cli",
        "app.supervisor",
        "worker",
    ),
    "app.services": ("app.api", "app.web", "app.main", "app.cli", "worker"),
    "app.http": ("app.api", "app.web", "app.main", "worker"),
    "app.api": ("app.web", "worker"),
    "app.web": ("app.api", "worker"),
    "app.client": ("app.core", "app.services", "app.http", "app.api", "app.web", "worker"),
}

# Cycles closed by a lazy import (one that runs inside a function): the module-level graph has none, and since
# issue 16's splits (lifecycle/training, run tokens, the task registry, the http errors) neither has this one.
# A new cycle fails the test; one that cannot be avoided is listed here with its reason.
KNOWN_CYCLES: dict[frozenset[str], str] = {}

# app module -> (worker modules it imports inside functions, why). New lazy imports of worker must be declared.
ALLOWED_LAZY_WORKER_IMPORTS: dict[str, tuple[frozenset[str], str]] = {
    "app.core.method_registry": (
        frozenset({"worker.methods"}),
        "the method registry is discovered from worker/methods/ (torch-free at import); the one door to it",
    ),
    "app.api.jobs": (frozenset({"worker.estimate"}), "the memory/time estimate loads torch on first use"),
    "app.web.pages": (frozenset({"worker.estimate"}), "the same estimate, shown on the job form"),
    "app.api.openai_compat": (
        frozenset({"worker.openai_generation"}),
        "try-out chat completions run in the web process with the base model kept warm",
    ),
    "app.services.generation": (
        frozenset({"worker.generation", "worker.merge"}),
        "try-out generation and merge-and-download run in the web process",
    ),
    "app.services.adapters": (
        frozenset({"worker.inference"}),
        "try-out classification runs in the web process",
    ),
    "app.services.causal_lm": (
        frozenset({"worker.preview"}),
        "the formatted-example preview needs the tokenizer",
    ),
    "app.services.preference": (
        frozenset({"worker.preview"}),
        "the preference preview (prompt, chosen, rejected as trained) needs the tokenizer",
    ),
    "app.cli": (
        frozenset({"worker.hardware", "worker.tiny_lm"}),
        "process entry point: `worker` prints the hardware, `make-tiny-lm` writes a tiny model",
    ),
}


@dataclass
class Module:
    """One module's imports: internal targets and external top-level packages, at module level and lazily."""

    name: str
    path: Path
    imports: set[str] = field(default_factory=set)
    external: set[str] = field(default_factory=set)
    lazy_imports: set[str] = field(default_factory=set)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: list[ast.AST], lazy: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``nodes``, with whether it runs only when a function is called."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, lazy
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _imports(list(node.orelse), lazy)
        else:
            inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from _imports(list(ast.iter_child_nodes(node)), inner)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]
) -> Iterator[str]:
    """The modules an import statement loads: ``from a import b`` means ``a.b`` where that is a module."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        yield candidate if candidate in known else base


@cache
def import_graph() -> dict[str, Module]:
    """Every module of app/ and worker/, with what it imports."""
    paths = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    modules = {_module_name(p): Module(_module_name(p), p) for p in paths}
    known = set(modules)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), filename=str(module.path))
        for node, lazy in _imports(list(tree.body)):
            for target in _targets(node, module.name, module.path.name == "__init__.py", known):
                internal = _internal(target, known)
                if internal is None:
                    if not lazy:
                        module.external.add(target.split(".")[0])
                elif internal != module.name:
                    (module.lazy_imports if lazy else module.imports).add(internal)
    return modules


def _internal(target: str, known: set[str]) -> str | None:
    """The known module an import target names (its longest known prefix), or None for third-party code."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's algorithm: the components of two or more modules (or one that imports itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_the_code() -> None:
    modules = import_graph()
    assert {"app.core.models", "app.core.spec", "app.http.auth", "worker.engine"} <= set(modules)
    assert (
        "app.core.models" in modules["app.core.spec"].imports
        or "app.core.settings" in modules["app.core.spec"].imports
    )
    assert "sqlmodel" in modules["app.core.models"].external
    assert "worker.estimate" in modules["app.api.jobs"].lazy_imports


def test_strongly_connected_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(map(sorted, strongly_connected(graph))) == [["a", "b", "c"], ["e"]]


@pytest.mark.parametrize("layer", ["app.core", "app.services"])
def test_core_and_services_import_no_web_framework_and_no_torch(layer: str) -> None:
    offending = {
        name: sorted(module.external & HEAVY)
        for name, module in import_graph().items()
        if _within(name, layer) and module.external & HEAVY
    }
    assert not offending, f"module-level imports of {sorted(HEAVY)} in {layer}: {offending}"


def test_nothing_in_app_imports_worker_at_module_level() -> None:
    offending = {
        name: sorted(t for t in module.imports if _within(t, "worker"))
        for name, module in import_graph().items()
        if _within(name, "app") and any(_within(t, "worker") for t in module.imports)
    }
    assert not offending, f"import these inside the function that needs them, and declare them: {offending}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer: str) -> None:
    offending = {
        name: sorted(t for t in module.imports if any(_within(t, f) for f in FORBIDDEN[layer]))
        for name, module in import_graph().items()
        if _within(name, layer)
    }
    offending = {name: targets for name, targets in offending.items() if targets}
    assert not offending, f"{layer} may not import {FORBIDDEN[layer]} at module level: {offending}"


def test_no_import_cycles_at_module_level() -> None:
    cycles = strongly_connected({name: module.imports for name, module in import_graph().items()})
    assert not cycles, f"import cycles at module level: {[sorted(c) for c in cycles]}"


def test_cycles_through_lazy_imports_are_the_known_ones_and_only_shrink() -> None:
    graph = {name: module.imports | module.lazy_imports for name, module in import_graph().items()}
    cycles = set(strongly_connected(graph))
    new = [sorted(c) for c in cycles - KNOWN_CYCLES.keys()]
    gone = [sorted(c) for c in KNOWN_CYCLES.keys() - cycles]
    assert not new, f"new import cycles (a lazy import does not hide a cycle): {new}"
    assert not gone, f"these cycles are gone (or changed): remove them from KNOWN_CYCLES: {gone}"


def test_lazy_imports_of_worker_from_app_are_declared() -> None:
    found = {
        name: frozenset(t for t in module.lazy_imports if _within(t, "worker"))
        for name, module in import_graph().items()
        if _within(name, "app")
    }
    found = {name: targets for name, targets in found.items() if targets}
    declared = {name: targets for name, (targets, _why) in ALLOWED_LAZY_WORKER_IMPORTS.items()}
    assert found == declared, "declare (or drop) lazy imports of worker in ALLOWED_LAZY_WORKER_IMPORTS"
