"""IA3 (Liu et al. 2022) via peft: learned vectors that rescale keys, values and feed-forward activations."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import peft_task_type


class Ia3Settings(BaseModel):
    """Which layers get a learned scaling vector, and which of them are feed-forward layers."""

    model_config = ConfigDict(extra="forbid")

    target_modules: list[str] | None = Field(
        default=None,
        description="Layers whose activations are rescaled (suffix match). Empty: peft's default for the "
        "architecture (BERT: key, value, output.dense; Llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | None = Field(
        default=None,
        description="Which of the target layers are feed-forward layers: their input is rescaled rather than "
        "their output. Empty: peft's default when the targets are too, otherwise none.",
    )

    @field_validator("target_modules", "feedforward_modules", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        # An empty list (e.g. a blank form field) means "peft's default", as an absent value does.
        return None if value == [] else value

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> "Ia3Settings":
        if self.feedforward_modules and self.target_modules is None:
            raise ValueError("set target_modules too when naming feedforward_modules")
        if self.feedforward_modules and self.target_modules is not None:
            missing = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if missing:
                raise ValueError(f"feedforward_modules {missing} must also be in target_modules")
        return self


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Wrap the base model with IA3 scaling vectors; they (and a new classification head) train."""
    from peft import IA3Config, get_peft_model

    assert isinstance(config, Ia3Settings)
    feedforward = config.feedforward_modules
    if config.target_modules is not None and feedforward is None:
        feedforward = []
    peft_config = IA3Config(
        task_type=peft_task_type(context.task),
        target_modules=config.target_modules,
        feedforward_modules=feedforward,
    )
    return BuiltModel(model=get_peft_model(model, peft_config))


METHOD = MethodInfo(
    name="ia3",
    title="IA3",
    summary="Learned vectors rescale keys, values and FFN activations: very few parameters, mergeable.",
    config=Ia3Settings,
    build=build,
    paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
    "Learning (NeurIPS 2022, arXiv:2205.05638)",
    learning_rate=5e-3,
)
