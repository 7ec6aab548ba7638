"""Full fine-tuning: every weight of the base model trains."""

from typing import Any

from pydantic import BaseModel, ConfigDict

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import load_transformers_model


class FullSettings(BaseModel):
    """Full fine-tuning has no settings of its own: the training arguments (learning rate!) matter."""

    model_config = ConfigDict(extra="forbid")


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Make every parameter trainable."""
    for param in model.parameters():
        param.requires_grad_(True)
    return BuiltModel(model=model)


METHOD = MethodInfo(
    name="full",
    title="Full fine-tuning",
    summary="Every weight trains: the strongest baseline, the most memory, a whole model as output.",
    config=FullSettings,
    build=build,
    load=load_transformers_model,
    saved_as="transformers",
    paper="Howard & Ruder 2018 (ULMFiT, arXiv:1801.06146); Devlin et al. 2019 (BERT, arXiv:1810.04805)",
    learning_rate=5e-5,
)
