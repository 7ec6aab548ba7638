"""The Hadamard adapter (Chen et al. 2023): an element-wise weight and bias on each attention output.

y = w ⊙ x + b per layer, w starting at 1 and b at 0. As in the paper, by default the normalization layers
train too, and the classification head trains alone for a first part of the steps (the paper's first stage)
before the adapter and the norms join it; ``train_layer_norm=False, classifier_first_fraction=0`` is the
reduced variant (adapter and head only, one stage). peft has no such method, hence our own (see
``_adapter_layers``, shipped with each adapter).
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._studio_adapter import build_studio_adapter, load_studio_adapter, save_studio_adapter


class HadamardSettings(BaseModel):
    """One weight and one bias vector per layer; which other parameters train, and the two-stage schedule."""

    model_config = ConfigDict(extra="forbid")

    train_layer_norm: bool = Field(
        default=True,
        description="Train the normalization layers (LayerNorm) with the adapter, as the paper does. Off: "
        "only the adapter vectors and the classification head train (fewer parameters, usually lower "
        "accuracy).",
    )
    classifier_first_fraction: float = Field(
        default=0.3,
        ge=0,
        lt=1,
        description="Fraction of the steps that train only the classification head before the adapter (and "
        "norms) join it: the paper's first stage. 0 trains everything from the first step. Ignored when the "
        "task has no new head (causal LM).",
    )


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Freeze the base (but the norms, by default) and add a Hadamard adapter on every attention output."""
    from worker.methods._adapter_layers import adapter_config

    assert isinstance(config, HadamardSettings)
    return build_studio_adapter(
        model,
        adapter_config("hadamard", ["attention"]),
        context,
        train_norms=config.train_layer_norm,
        head_first_fraction=config.classifier_first_fraction,
    )


METHOD = MethodInfo(
    name="hadamard",
    title="Hadamard adapter",
    summary="An element-wise weight and bias on each attention output, plus the layer norms; the head trains alone "
    "first (the paper's recipe): about 15 thousand parameters on MiniLM.",
    config=HadamardSettings,
    build=build,
    save=save_studio_adapter,
    load=load_studio_adapter,
    saved_as="studio",
    paper="Chen et al. 2023, Hadamard Adapter: An Extreme Parameter-Efficient Adapter Tuning Method for "
    "Pre-trained Language Models (CIKM 2023, doi:10.1145/3583780.3614904, arXiv:2407.11033)",
    learning_rate=5e-3,
)
