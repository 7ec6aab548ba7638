"""Full fine-tuning with layer-wise learning-rate decay: lower layers move less than upper ones."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import adamw_groups, load_transformers_model, split_by_layer


class LlrdSettings(BaseModel):
    """Learning rate per depth: lr · decay^depth."""

    model_config = ConfigDict(extra="forbid")

    decay: float = Field(
        default=0.85,
        gt=0,
        le=1,
        description="Multiplier per layer going down. The head (and anything above the layers) gets the full "
        "learning rate, the top layer lr·decay, the next lr·decay², …, the embeddings lr·decay^(layers+1). "
        "1 is plain full fine-tuning; 0.8–0.95 is usual.",
    )


def depth_groups(model: Any, decay: float, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups, one learning rate per depth (0 for the head, layers+1 for the embeddings)."""
    before, per_layer, after = split_by_layer(model)
    depth_of = [(0, after)]
    depth_of += [(len(per_layer) - index, layer) for index, layer in enumerate(per_layer)]
    depth_of.append((len(per_layer) + 1, before))
    groups: list[dict[str, Any]] = []
    for depth, named in depth_of:
        for group in adamw_groups(named, lr * decay**depth, weight_decay):
            groups.append({**group, "depth": depth})
    return groups


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Train every weight, with an AdamW whose parameter groups carry the decayed learning rates."""
    import torch

    assert isinstance(config, LlrdSettings)
    for param in model.parameters():
        param.requires_grad_(True)

    def optimizer(trainable: Any) -> Any:
        groups = depth_groups(trainable, config.decay, context.learning_rate, context.weight_decay)
        return torch.optim.AdamW(groups, lr=context.learning_rate)

    return BuiltModel(model=model, optimizer_factory=optimizer)


METHOD = MethodInfo(
    name="llrd",
    title="Layer-wise LR decay",
    summary="Full fine-tuning where each lower layer gets a smaller learning rate (lr·decay^depth).",
    config=LlrdSettings,
    build=build,
    load=load_transformers_model,
    saved_as="transformers",
    paper="Howard & Ruder 2018 (ULMFiT's discriminative fine-tuning, arXiv:1801.06146); Zhang et al. 2021, "
    "Revisiting Few-sample BERT Fine-tuning (arXiv:2006.05987)",
    learning_rate=1e-4,
)
