"""Prefix tuning (Li & Liang 2021) via peft: learned keys and values prepended in every attention layer."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import peft_task_type


class PrefixSettings(BaseModel):
    """How many virtual tokens, and whether they come out of a small MLP."""

    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(
        default=20, ge=1, le=512, description="Length of the learned prefix in every layer (key/value pairs)."
    )
    prefix_projection: bool = Field(
        default=False,
        description="Produce the prefix with a two-layer MLP (reparameterisation: steadier training, many "
        "more parameters while training; only the resulting prefix is saved).",
    )
    encoder_hidden_size: int | None = Field(
        default=None, ge=1, le=65536, description="Hidden size of that MLP. Empty: the model's hidden size."
    )


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Wrap the base model with a trainable prefix (and a new classification head)."""
    from peft import PrefixTuningConfig, get_peft_model

    assert isinstance(config, PrefixSettings)
    peft_config = PrefixTuningConfig(
        task_type=peft_task_type(context.task),
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
    )
    if config.encoder_hidden_size:
        peft_config.encoder_hidden_size = config.encoder_hidden_size
    return BuiltModel(model=get_peft_model(model, peft_config))


METHOD = MethodInfo(
    name="prefix",
    virtual_tokens=True,
    title="Prefix tuning",
    summary="Learned key/value vectors prepended in every attention layer; the base stays untouched.",
    config=PrefixSettings,
    build=build,
    paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation (ACL 2021, "
    "arXiv:2101.00190)",
    learning_rate=1e-2,
)
