"""Glue between the registry and the studio's own adapters (``_adapter_layers``): build, save, load."""

import shutil
from pathlib import Path
from typing import Any

from worker.methods import BuildContext, BuiltModel
from worker.methods._common import freeze_all_but, head_parameters

LOADER_FILE = "studio_adapters.py"


def norm_parameters(model: Any) -> list[Any]:
    """The parameters of every normalization layer (LayerNorm, RMSNorm; embeddings' and each layer's)."""
    from torch import nn

    found = []
    for module in model.modules():
        kind = type(module).__name__
        if isinstance(module, nn.LayerNorm) or kind.endswith(("LayerNorm", "RMSNorm")):
            found.extend(module.parameters(recurse=False))
    return found


def build_studio_adapter(
    model: Any,
    config: dict[str, Any],
    context: BuildContext,
    train_norms: bool = False,
    head_first_fraction: float = 0.0,
) -> BuiltModel:
    """Freeze the base, attach the adapters the config describes; they and a new classification head train,
    and the normalization layers too with ``train_norms``. ``head_first_fraction`` of the steps train the head
    alone first (a two-stage schedule; see ``HeadFirst``), where there is a new head to train."""
    from worker.methods import _adapter_layers

    head = head_parameters(model, context.task)
    freeze_all_but(model, head + (norm_parameters(model) if train_norms else []))
    _adapter_layers.add_adapters(model, config)
    model.studio_adapter_config = config
    callbacks = []
    head_steps = int(round(head_first_fraction * (context.total_steps or 0)))
    if head and head_steps > 0:
        callbacks.append(head_first_callback(head, head_first_fraction))
    return BuiltModel(model=model, callbacks=callbacks)


def head_first_callback(head: list[Any], fraction: float) -> Any:
    """A TrainerCallback training only the classification head for the first ``fraction`` of the steps.

    During those steps the other trainable parameters are set to not require gradients from the start of a
    step to its end: no gradient is computed for them, so the optimizer skips them (no update, no weight
    decay, no Adam state). Between steps every parameter is trainable again, so checkpoints, saved adapters
    and parameter counts see the same set in both stages, and a resumed run decides the stage from the
    restored global step alone. (Not for multi-GPU runs: DDP expects the same parameters to get gradients
    every step.)
    """
    from transformers import TrainerCallback

    head_ids = {id(p) for p in head}

    class HeadFirst(TrainerCallback):
        def __init__(self) -> None:
            self.paused: list[Any] = []

        def on_step_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if model is None or state.global_step >= int(round(fraction * state.max_steps)):
                return
            self.paused = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
            for param in self.paused:
                param.requires_grad_(False)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for param in self.paused:
                param.requires_grad_(True)
            self.paused = []

    return HeadFirst()


def save_studio_adapter(model: Any, folder: str) -> None:
    """The config, the trained tensors and a copy of the standalone loader (``studio_adapters.py``)."""
    from worker.methods import _adapter_layers

    _adapter_layers.save_adapter(model, folder, model.studio_adapter_config)
    shutil.copyfile(_adapter_layers.__file__, Path(folder) / LOADER_FILE)


def load_studio_adapter(base_model: Any, folder: str, adapter_name: str) -> Any:
    """Attach a saved adapter to a fresh base model."""
    from worker.methods import _adapter_layers

    return _adapter_layers.load_adapter(base_model, folder)
