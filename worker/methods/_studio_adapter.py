"""Glue between the registry and the studio's own adapters (``_adapter_layers``): build, save, load."""

import shutil
from pathlib import Path
from typing import Any

from worker.methods import BuildContext, BuiltModel
from worker.methods._common import freeze_all_but, head_parameters

LOADER_FILE = "studio_adapters.py"


def build_studio_adapter(model: Any, config: dict[str, Any], context: BuildContext) -> BuiltModel:
    """Freeze the base, attach the adapters the config describes; they and a new classification head train."""
    from worker.methods import _adapter_layers

    head = head_parameters(model, context.task)
    freeze_all_but(model, head)
    _adapter_layers.add_adapters(model, config)
    model.studio_adapter_config = config
    return BuiltModel(model=model)


def save_studio_adapter(model: Any, folder: str) -> None:
    """The config, the trained tensors and a copy of the standalone loader (``studio_adapters.py``)."""
    from worker.methods import _adapter_layers

    _adapter_layers.save_adapter(model, folder, model.studio_adapter_config)
    shutil.copyfile(_adapter_layers.__file__, Path(folder) / LOADER_FILE)


def load_studio_adapter(base_model: Any, folder: str, adapter_name: str) -> Any:
    """Attach a saved adapter to a fresh base model."""
    from worker.methods import _adapter_layers

    return _adapter_layers.load_adapter(base_model, folder)
