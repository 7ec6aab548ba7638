"""Partial fine-tuning: only the top k transformer layers and what sits above them (norm, pooler, head)."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import freeze_all_but, load_transformers_model, split_by_layer


class FreezeSettings(BaseModel):
    """Freeze the embeddings and the lower layers."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(
        default=2,
        ge=0,
        le=1000,
        description="How many of the top transformer layers train (0: only the head). A k at or beyond the "
        "model's depth trains every layer, but never the embeddings.",
    )


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Unfreeze the top k layers and every parameter registered after the layer stack."""
    assert isinstance(config, FreezeSettings)
    _, per_layer, after = split_by_layer(model)
    top = per_layer[len(per_layer) - config.k :] if config.k else []
    freeze_all_but(model, [p for layer in top for _, p in layer] + [p for _, p in after])
    return BuiltModel(model=model)


METHOD = MethodInfo(
    name="freeze",
    title="Freeze lower layers",
    summary="Only the top k transformer layers and the head train; cheap backward pass, a whole model out.",
    config=FreezeSettings,
    build=build,
    load=load_transformers_model,
    saved_as="transformers",
    paper="Lee et al. 2019, What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning "
    "(arXiv:1911.03090)",
    learning_rate=1e-4,
)
