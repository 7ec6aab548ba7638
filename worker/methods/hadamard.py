"""The Hadamard adapter (Chen et al. 2023): an element-wise weight and bias on each attention output.

y = w ⊙ x + b per layer, w starting at 1 and b at 0; with the classification head, the only trainable
parameters. peft has no such method, hence our own (see ``_adapter_layers``, shipped with each adapter).
"""

from typing import Any

from pydantic import BaseModel, ConfigDict

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._studio_adapter import build_studio_adapter, load_studio_adapter, save_studio_adapter


class HadamardSettings(BaseModel):
    """The Hadamard adapter has no settings: one weight and one bias vector per layer."""

    model_config = ConfigDict(extra="forbid")


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Freeze the base and add a Hadamard adapter on every attention output."""
    from worker.methods._adapter_layers import adapter_config

    return build_studio_adapter(model, adapter_config("hadamard", ["attention"]), context)


METHOD = MethodInfo(
    name="hadamard",
    title="Hadamard adapter",
    summary="An element-wise weight and bias on each attention output: a few thousand parameters.",
    config=HadamardSettings,
    build=build,
    save=save_studio_adapter,
    load=load_studio_adapter,
    saved_as="studio",
    paper="Chen et al. 2023, Hadamard Adapter: An Extreme Parameter-Efficient Adapter Tuning Method for "
    "Pre-trained Language Models (CIKM 2023, doi:10.1145/3583780.3614904, arXiv:2407.11033)",
    learning_rate=5e-3,
)
