"""Prompt tuning (Lester et al. 2021) via peft: learned input embeddings prepended to every example."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import peft_task_type


class PromptSettings(BaseModel):
    """How many virtual tokens, and how they start."""

    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(
        default=20,
        ge=1,
        le=512,
        description="Length of the learned soft prompt. It shares the model's positions with the input: "
        "virtual tokens + max length must fit the model's maximum length.",
    )
    init: Literal["random", "text"] = Field(
        default="random",
        description="Start from random embeddings, or from the embeddings of the init text's tokens "
        "(usually trains faster and steadier).",
    )
    init_text: str = Field(
        default="",
        max_length=2000,
        description="With init = text: e.g. 'Classify whether the review is positive or negative:'. Its "
        "tokens are repeated or cut to the number of virtual tokens.",
    )

    @model_validator(mode="after")
    def _text_for_text_init(self) -> "PromptSettings":
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("init = text needs an init_text")
        return self


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Wrap the base model with a trainable soft prompt (and a new classification head)."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    assert isinstance(config, PromptSettings)
    from_text = config.init == "text"
    if from_text and not context.base_model_path:
        raise ValueError(
            "prompt tuning from text needs the base model's tokenizer (no base_model_path given)"
        )
    peft_config = PromptTuningConfig(
        task_type=peft_task_type(context.task),
        num_virtual_tokens=config.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=config.init_text if from_text else None,
        tokenizer_name_or_path=context.base_model_path if from_text else None,
    )
    return BuiltModel(model=get_peft_model(model, peft_config))


METHOD = MethodInfo(
    name="prompt",
    virtual_tokens=True,
    title="Prompt tuning",
    summary="A learned soft prompt prepended to the input embeddings: the fewest parameters, a high lr.",
    config=PromptSettings,
    build=build,
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning (EMNLP 2021, "
    "arXiv:2104.08691)",
    learning_rate=3e-2,
)
