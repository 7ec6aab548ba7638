"""Bottleneck adapters: Houlsby et al. 2019 (after attention and FFN) and Pfeiffer et al. 2020 (after FFN).

A bottleneck (down-projection, non-linearity, up-projection, residual) on a sub-block's output; the base stays
frozen but for its layer norms, which Houlsby et al. train too (Houlsby's default; Pfeiffer's keeps them frozen,
as AdapterFusion does). peft has no such method, hence our own (see ``_adapter_layers``, shipped with each adapter).
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._studio_adapter import build_studio_adapter, load_studio_adapter, save_studio_adapter


class BottleneckSettings(BaseModel):
    """Bottleneck width and non-linearity."""

    model_config = ConfigDict(extra="forbid")

    reduction_factor: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Hidden size divided by the bottleneck width (16 on a 384-wide model: 24 units). Smaller "
        "means a wider bottleneck: more parameters and capacity.",
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        default="relu", description="Activation between the down- and up-projection."
    )
    train_layer_norm: bool = Field(
        default=False,
        description="Train the base model's normalization layers (LayerNorm) with the adapters.",
    )


class HoulsbySettings(BottleneckSettings):
    """Houlsby et al. train the layer norms with the adapters: on by default."""

    train_layer_norm: bool = Field(
        default=True,
        description="Train the base model's normalization layers (LayerNorm) with the adapters, as Houlsby "
        "et al. do. Off: only the adapters and the classification head train.",
    )


class PfeifferSettings(BottleneckSettings):
    """Pfeiffer et al. train only the adapters (and the head): the layer norms stay frozen by default."""

    train_layer_norm: bool = Field(
        default=False,
        description="Train the base model's normalization layers (LayerNorm) with the adapter. Pfeiffer et al. "
        "keep them frozen (the default); on, it trains them as Houlsby et al. do.",
    )


def _builder(positions: list[str]) -> Any:
    def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
        """Freeze the base and add bottleneck adapters at the method's positions."""
        from worker.methods._adapter_layers import adapter_config

        assert isinstance(config, BottleneckSettings)
        description = adapter_config("bottleneck", positions, config.reduction_factor, config.non_linearity)
        return build_studio_adapter(model, description, context, train_norms=config.train_layer_norm)

    return build


HOULSBY = MethodInfo(
    name="houlsby",
    title="Houlsby adapter",
    summary="Bottleneck adapters after both the attention and the feed-forward block of every layer.",
    config=HoulsbySettings,
    build=_builder(["attention", "ffn"]),
    save=save_studio_adapter,
    load=load_studio_adapter,
    saved_as="studio",
    paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (ICML 2019, arXiv:1902.00751)",
    learning_rate=1e-3,
)

PFEIFFER = MethodInfo(
    name="pfeiffer",
    title="Pfeiffer adapter",
    summary="One bottleneck adapter per layer, after the feed-forward block: half of Houlsby's parameters.",
    config=PfeifferSettings,
    build=_builder(["ffn"]),
    save=save_studio_adapter,
    load=load_studio_adapter,
    saved_as="studio",
    paper="Pfeiffer et al. 2020, AdapterFusion: Non-Destructive Task Composition for Transfer Learning "
    "(EACL 2021, arXiv:2005.00247)",
    learning_rate=1e-3,
)

METHODS = (HOULSBY, PFEIFFER)
