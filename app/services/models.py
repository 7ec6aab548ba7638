"""The model library: every base model the studio can use, described from its files alone.

Three sources: the bundled MiniLM, model folders inside the admin's registered folders
(``PEFT_STUDIO_MODEL_FOLDERS``) and Hub repositories in the local Hub cache (``HF_HOME`` /
``HF_HUB_CACHE``, listed with ``huggingface_hub.scan_cache_dir``). Nothing here imports torch or loads
weights: the parameter count is the sum of the tensor shapes in the safetensors headers (a safetensors file
starts with an 8-byte little-endian header length and a JSON header naming every tensor's dtype and shape),
the rest comes from config.json, tokenizer_config.json and the model card's front matter.
"""

import json
import shutil
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from math import prod
from pathlib import Path
from typing import Any

from app.core.base_models import BUNDLED_MODEL_ID, bundled_model_path, registered_folders
from app.core.errors import Forbidden, InvalidSpec, NotFound
from app.core.tasks import CAUSAL_LM, CLASSIFICATION, PREFERENCE

# The largest safetensors header we read: real ones are a few hundred KiB even for 70B models.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Model types of encoders the classification recipe fine-tunes (AutoModelForSequenceClassification).
_ENCODER_TYPES = {
    "albert",
    "bert",
    "camembert",
    "deberta",
    "deberta-v2",
    "distilbert",
    "electra",
    "ernie",
    "modernbert",
    "mpnet",
    "roberta",
    "xlm-roberta",
}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Bytes per element of each safetensors dtype, for the dtype shown when config.json does not say.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8"}

# Where to start when the library is empty: ids that exist on the Hub and why each is a good first choice.
RECOMMENDED: list[dict[str, str]] = [
    {
        "task": CLASSIFICATION,
        "size": "small",
        "model_id": "answerdotai/ModernBERT-base",
        "why": "149M-parameter encoder with an 8k context; a strong modern default for text classification.",
    },
    {
        "task": CLASSIFICATION,
        "size": "medium",
        "model_id": "microsoft/deberta-v3-base",
        "why": "184M parameters; tops classification benchmarks among base-size encoders.",
    },
    {
        "task": CAUSAL_LM,
        "size": "small",
        "model_id": "Qwen/Qwen2.5-0.5B-Instruct",
        "why": "0.5B parameters with a chat template; LoRA trains on a CPU or any GPU.",
    },
    {
        "task": CAUSAL_LM,
        "size": "medium",
        "model_id": "meta-llama/Llama-3.2-3B-Instruct",
        "why": "3B parameters, gated (save a Hub token on your account page); QLoRA fits a 24 GB GPU.",
    },
    {
        "task": CAUSAL_LM,
        "size": "large",
        "model_id": "mistralai/Mistral-7B-Instruct-v0.3",
        "why": "7B parameters, Apache-2.0; QLoRA fits a 24 GB GPU, LoRA in bfloat16 needs about 40 GB.",
    },
]


@dataclass
class LibraryModel:
    """One model of the library, as the Models page and ``/api/v1/models`` show it."""

    model_id: str
    source: str  # bundled, folder or hub
    path: str
    architecture: str | None = None
    model_type: str | None = None
    parameters: int | None = None
    context_length: int | None = None
    dtype: str | None = None
    size_bytes: int = 0
    chat_template: bool = False
    licence: str | None = None
    tasks: list[str] = field(default_factory=list)
    fetched_at: datetime | None = None
    revision: str | None = None
    custom_code: bool = False
    weights: str = "none"  # safetensors, pickle or none
    problems: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        """The JSON shape of this model."""
        data = dict(self.__dict__)
        data["fetched_at"] = self.fetched_at.isoformat() if self.fetched_at else None
        return data


def safetensors_parameters(folder: Path) -> tuple[int | None, str | None]:
    """(parameter count, most common dtype) from the headers of every ``*.safetensors`` file in a folder;
    (None, None) when there is none or a header is unreadable."""
    total = 0
    dtype_counts: dict[str, int] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None, None
    for file in files:
        try:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > _MAX_HEADER_BYTES:
                    return None, None
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            return None, None
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            count = prod(int(n) for n in tensor.get("shape", []))
            total += count
            dtype = str(tensor.get("dtype", ""))
            dtype_counts[dtype] = dtype_counts.get(dtype, 0) + count
    common = max(dtype_counts, key=lambda d: dtype_counts[d]) if dtype_counts else None
    return total, _SAFETENSORS_DTYPES.get(common or "", common.lower() if common else None)


def tasks_for(config: dict[str, Any]) -> list[str]:
    """Which studio tasks a model suits, from its config: causal LMs instruction-tune and preference-tune, encoders
    classify."""
    architectures = [str(a) for a in config.get("architectures") or []]
    model_type = str(config.get("model_type") or "")
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures):
        return [CAUSAL_LM, PREFERENCE]
    if model_type in _ENCODER_TYPES or any(a.endswith("ForSequenceClassification") for a in architectures):
        return [CLASSIFICATION]
    return []


def card_licence(folder: Path) -> str | None:
    """The ``license:`` of the model card's YAML front matter (README.md), when there is one."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8", errors="replace")[:20_000]
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    for line in front.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("license", "licence") and value.strip():
            return value.strip().strip("'\"")
    return None


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))


def _folder_size(folder: Path) -> int:
    """Bytes on disk under a folder, each blob once (the Hub cache's snapshots are symlinks to blobs)."""
    seen: set[Path] = set()
    total = 0
    for path in folder.rglob("*"):
        try:
            target = path.resolve()
            if target in seen or not target.is_file():
                continue
            seen.add(target)
            total += target.stat().st_size
        except OSError:
            continue
    return total


def describe(model_id: str, source: str, folder: Path) -> LibraryModel:
    """A library entry read from a model folder's files (config, safetensors headers, tokenizer, card)."""
    model = LibraryModel(model_id=model_id, source=source, path=str(folder))
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        model.problems.append(f"config.json unreadable ({exc.__class__.__name__})")
        config = {}
    if not isinstance(config, dict):
        config = {}
    architectures = config.get("architectures") or []
    model.architecture = str(architectures[0]) if architectures else None
    model.model_type = str(config["model_type"]) if config.get("model_type") else None
    model.context_length = next((config[k] for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    model.parameters, weights_dtype = safetensors_parameters(folder)
    model.dtype = str(config.get("torch_dtype") or config.get("dtype") or weights_dtype or "") or None
    model.chat_template = _has_chat_template(folder)
    model.licence = card_licence(folder)
    model.tasks = tasks_for(config)
    model.custom_code = bool(config.get("auto_map"))
    if any(folder.glob("*.safetensors")):
        model.weights = "safetensors"
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        model.weights = "pickle"
        model.problems.append("only pickle weights (refused: safetensors only)")
    model.size_bytes = _folder_size(folder)
    return model


def hub_cache_dir() -> Path:
    """The Hub cache every worker shares (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``), read when called so
    a changed environment (or test) is seen."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _hub_cache_models() -> list[LibraryModel]:
    """Hub model repositories in the local cache, the newest snapshot of each."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        return []
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: r.last_modified)
        if not (revision.snapshot_path / "config.json").is_file():
            continue
        model = describe(repo.repo_id, "hub", revision.snapshot_path)
        model.size_bytes = repo.size_on_disk
        model.revision = revision.commit_hash
        model.fetched_at = datetime.fromtimestamp(revision.last_modified, UTC)
        models.append(model)
    return models


def _folder_models() -> list[LibraryModel]:
    """Model folders (holding a config.json) directly inside, or one level below, the registered folders."""
    from app.core.base_models import _forbidden_roots, _inside

    forbidden = _forbidden_roots()
    models = []
    for root in registered_folders():
        if not root.is_dir():
            continue
        candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
        for folder in candidates:
            if _inside(folder.resolve(), forbidden) or not (folder / "config.json").is_file():
                continue
            model = describe(str(folder), "folder", folder)
            model.fetched_at = datetime.fromtimestamp((folder / "config.json").stat().st_mtime, UTC)
            models.append(model)
    return models


def list_models(task: str | None = None) -> list[LibraryModel]:
    """Every model the studio can use (bundled first, then registered folders, then the Hub cache),
    optionally only those suited to one task."""
    bundled = describe(BUNDLED_MODEL_ID, "bundled", bundled_model_path())
    models = [bundled, *_folder_models(), *_hub_cache_models()]
    if task:
        models = [m for m in models if task in m.tasks]
    return models


def get_model(model_id: str) -> LibraryModel:
    """One library model by id, or NotFound."""
    for model in list_models():
        if model.model_id == model_id:
            return model
    raise NotFound(f"Model {model_id!r} is not in the library. GET /api/v1/models lists what is.")


def delete_model(model_id: str) -> int:
    """Remove a Hub model from the local cache (every revision) and return the bytes freed. The bundled
    model and registered folders belong to the installation and the admin's disk, not the studio: refused."""
    model = get_model(model_id)
    if model.source != "hub":
        raise Forbidden(
            f"Model {model_id!r} is {'the bundled model' if model.source == 'bundled' else 'a registered folder'}"
            "; only models downloaded into the Hub cache can be deleted here."
        )
    from huggingface_hub import scan_cache_dir

    repo = next(
        r for r in scan_cache_dir(hub_cache_dir()).repos if r.repo_id == model_id and r.repo_type == "model"
    )
    shutil.rmtree(repo.repo_path)
    return int(repo.size_on_disk)


def check_model_id(model_id: str) -> str:
    """A Hub id as typed (``owner/name``), or InvalidSpec naming the expected shape."""
    from app.core.base_models import _HUB_ID

    model_id = model_id.strip()
    if "/" not in model_id or not _HUB_ID.fullmatch(model_id):
        raise InvalidSpec(
            f"{model_id!r} is not a Hub model id: expected owner/name, e.g. Qwen/Qwen2.5-0.5B-Instruct.",
            field="model_id",
        )
    return model_id
