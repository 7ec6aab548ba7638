"""P-tuning (Liu et al. 2021) via peft: a soft prompt produced by a small trainable encoder (MLP or LSTM)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import peft_task_type


class PTuningSettings(BaseModel):
    """How many virtual tokens and the prompt encoder's shape."""

    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(
        default=20,
        ge=1,
        le=512,
        description="Length of the learned prompt. It shares the model's positions with the input: "
        "virtual tokens + max length must fit the model's maximum length.",
    )
    encoder: Literal["MLP", "LSTM"] = Field(
        default="MLP",
        description="The prompt encoder: an MLP (fast) or a bidirectional LSTM followed by an MLP (the "
        "paper's).",
    )
    encoder_hidden_size: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Hidden size of the prompt encoder. Empty: the model's hidden size.",
    )


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Wrap the base model with a prompt encoder (and a new classification head)."""
    from peft import PromptEncoderConfig, get_peft_model

    assert isinstance(config, PTuningSettings)
    peft_config = PromptEncoderConfig(
        task_type=peft_task_type(context.task),
        num_virtual_tokens=config.num_virtual_tokens,
        encoder_reparameterization_type=config.encoder,
    )
    if config.encoder_hidden_size:  # else peft uses the model's hidden size
        peft_config.encoder_hidden_size = config.encoder_hidden_size
    return BuiltModel(model=get_peft_model(model, peft_config))


METHOD = MethodInfo(
    name="ptuning",
    virtual_tokens=True,
    title="P-tuning",
    summary="A soft prompt produced by a small MLP/LSTM encoder; only the resulting prompt is saved.",
    config=PTuningSettings,
    build=build,
    paper="Liu et al. 2021, GPT Understands, Too (arXiv:2103.10385)",
    learning_rate=1e-2,
)
