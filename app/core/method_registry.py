"""The fine-tuning methods by name, as the web process and the job spec read them.

The registry is discovered from ``worker/methods/`` (one module per method; torch and peft are imported only
inside their functions). It is reached here, on first use, so that nothing under ``app/`` imports ``worker``
at module level and this is the one place where the web side touches the method modules (listed in
``tests/test_layout.py``). The declarative half (``MethodInfo``, the configs) is to move into ``app/core`` in a
later step of issue 16; then this import goes.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.methods import MethodInfo


def registry() -> dict[str, "MethodInfo"]:
    """Every fine-tuning method, by name (``worker.methods.registry``, cached there)."""
    from worker.methods import registry as discovered

    return discovered()
