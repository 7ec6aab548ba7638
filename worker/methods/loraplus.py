"""LoRA+: LoRA with a larger learning rate for the B matrices, via peft's create_loraplus_optimizer."""

from typing import Any

from pydantic import BaseModel, Field

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods.lora import LoraSettings, peft_lora_config


class LoraPlusSettings(LoraSettings):
    """LoRA settings plus the learning-rate ratio between B and A."""

    lr_ratio: float = Field(
        default=16.0,
        ge=1.0,
        le=1000.0,
        description="Learning rate of the B matrices divided by that of the A matrices (the job's learning "
        "rate). The paper recommends 16; lower the job's learning rate by ~2× compared with plain LoRA.",
    )


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """LoRA adapters, trained by an AdamW whose B-matrix group runs at lr · lr_ratio."""
    import torch
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    assert isinstance(config, LoraPlusSettings)
    peft_model = get_peft_model(model, peft_lora_config(config, context.task))

    def optimizer(trainable: Any) -> Any:
        return create_loraplus_optimizer(
            trainable,
            torch.optim.AdamW,
            lr=context.learning_rate,
            loraplus_lr_ratio=config.lr_ratio,
            weight_decay=context.weight_decay,
        )

    return BuiltModel(model=peft_model, optimizer_factory=optimizer)


METHOD = MethodInfo(
    name="loraplus",
    title="LoRA+",
    summary="LoRA whose B matrices learn lr_ratio× faster than A: often faster convergence at the same cost.",
    config=LoraPlusSettings,
    build=build,
    paper="Hayou et al. 2024, LoRA+: Efficient Low Rank Adaptation of Large Models (arXiv:2402.12354)",
    learning_rate=2e-4,
)
