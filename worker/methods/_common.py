"""Helpers shared by several methods: a model's layer stack, its new head, peft task types."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.tasks import CLASSIFICATION


def peft_task_type(task: str) -> Any:
    """peft's TaskType for a studio task."""
    from peft import TaskType

    return TaskType.SEQ_CLS if task == CLASSIFICATION else TaskType.CAUSAL_LM


def layer_stack(model: Any) -> tuple[str, Any]:
    """The transformer blocks: the ModuleList of same-class modules holding the most parameters.

    Returns its qualified name (``bert.encoder.layer``, ``model.layers``, ``transformer.h``) and the list.
    """
    from worker.methods._adapter_layers import layer_stack as find_layer_stack

    return find_layer_stack(model)


def split_by_layer(
    model: Any,
) -> tuple[list[tuple[str, Any]], list[list[tuple[str, Any]]], list[tuple[str, Any]]]:
    """The named parameters before the layer stack (embeddings), per layer, and after it (final norm, pooler,
    head), in the order the model registers them. A weight tied to the input embeddings counts as before."""
    name, layers = layer_stack(model)
    before: list[tuple[str, Any]] = []
    per_layer: list[list[tuple[str, Any]]] = [[] for _ in layers]
    after: list[tuple[str, Any]] = []
    prefix = f"{name}."
    for param_name, param in model.named_parameters():
        if param_name.startswith(prefix):
            index = int(param_name[len(prefix) :].split(".", 1)[0])
            per_layer[index].append((param_name, param))
        elif any(per_layer):
            after.append((param_name, param))
        else:
            before.append((param_name, param))
    return before, per_layer, after


def head_parameters(model: Any, task: str) -> list[Any]:
    """The parameters of a classification head (everything outside the backbone: ``classifier``,
    ``score``), which start untrained and so train with any method. Empty for causal LMs (pretrained head)."""
    if task != CLASSIFICATION:
        return []
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        return []
    inside = {id(p) for p in backbone.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def freeze_all_but(model: Any, trainable: list[Any]) -> None:
    """Freeze every parameter, then unfreeze the given ones."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)


def adamw_groups(named: list[tuple[str, Any]], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups at one learning rate: weight decay on matrices only (not biases or norms)."""
    decay = [p for _, p in named if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in named if p.requires_grad and p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def load_transformers_model(base_model: Any, folder: str, adapter_name: str) -> Any:
    """Load a complete saved model (full, freeze, llrd): a plain transformers folder of the base's class.

    The base model passed in only tells the class; its weights are replaced wholesale by the folder's.
    """
    return type(base_model).from_pretrained(folder)


# ``MethodInfo.extra`` key of a method's ``CheckpointState``: state that lives outside the trainable tensors
# (AdaLoRA's rank pattern and importance averages) and must travel with each checkpoint for a resumed run
# to continue as the uninterrupted one would.
CHECKPOINT_STATE = "checkpoint_state"


@dataclass(frozen=True)
class CheckpointState:
    """Save a method's extra training state into a checkpoint folder, and load it back into a rebuilt model."""

    save: Callable[[Any, Path], None]
    load: Callable[[Any, Path], None]


def checkpoint_state(method: Any) -> CheckpointState | None:
    """The method's ``CheckpointState`` hook (None for most methods, whose state is their tensors)."""
    extra = getattr(method, "extra", None) or {}
    hook = extra.get(CHECKPOINT_STATE)
    return hook if isinstance(hook, CheckpointState) else None
