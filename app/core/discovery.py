"""Registries found by discovery: every module of a package (those starting with ``_`` skipped) that defines a
registry entry under a known name. Methods (``worker/methods``), tasks (``app/core/task_defs``) and recipes
(``worker/recipes``) are all found this way, so adding one is adding a module."""

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def discover(
    package: str,
    path: Iterable[str],
    attributes: tuple[str, ...],
    kind: type[T],
    key: Callable[[T], str],
    what: str,
) -> dict[str, T]:
    """The entries of type ``kind`` that the modules of ``package`` define under ``attributes`` (an attribute
    may hold one entry or a list of them), keyed by ``key``, in module-name order; two entries with one key
    are an error naming ``what`` ("two methods are registered as 'lora'")."""
    found: dict[str, T] = {}
    for module_info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{module_info.name}")
        for attribute in attributes:
            value = getattr(module, attribute, None)
            for entry in value if isinstance(value, list | tuple) else [value]:
                if isinstance(entry, kind):
                    name = key(entry)
                    if name in found:
                        raise RuntimeError(f"two {what} are registered as {name!r}")
                    found[name] = entry
    return found
