"""Merge an adapter into its base model and write a complete transformers model folder.

The base is always loaded in full precision: a QLoRA adapter (trained on a 4-bit base) is merged into the
dequantized base, which is what its weights approximate; merging into 4-bit weights would round the update
away. Methods whose update is a weight delta (the LoRA family, IA3 and peft's other weight adapters) can be
merged; prompt-based ones (prefix/prompt tuning, P-tuning) and the studio's own adapters cannot.
"""

import json
import shutil
from pathlib import Path
from typing import Any

from app.core.base_models import resolve_base_model
from app.core.errors import InvalidSpec

STUDIO_FILE = "studio.json"
# peft adapter types that merge_and_unload() folds into the base weights.
MERGEABLE_PEFT_TYPES = frozenset(
    {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA", "FOURIERFT"}
)


def peft_type(folder: Path) -> str | None:
    """The peft adapter type saved in a folder, or None when it holds no peft adapter."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("peft_type") if isinstance(config, dict) else None
    return str(value) if value else None


def check_mergeable(folder: Path, adapter_id: int, method: str) -> None:
    """InvalidSpec unless the adapter in ``folder`` can be merged into its base."""
    from worker.methods import registry

    saved_as = registry()[method].saved_as if method in registry() else "peft"
    if saved_as == "transformers":
        raise InvalidSpec(
            f"Adapter {adapter_id} ({method}) is already a complete model, with nothing to merge; download it.",
            field="adapter",
        )
    kind = peft_type(folder) if saved_as == "peft" else None
    if kind is None:
        raise InvalidSpec(
            f"Adapter {adapter_id} ({method}) is not a peft weight adapter, so it cannot be merged into the "
            "base; download the adapter instead.",
            field="adapter",
        )
    if kind not in MERGEABLE_PEFT_TYPES:
        raise InvalidSpec(
            f"Adapter {adapter_id} ({method}, peft type {kind}) adds virtual tokens rather than changing weights "
            "and cannot be merged into the base; download the adapter and load it with peft.",
            field="adapter",
        )


def merge_into_base(folder: Path, target: Path) -> Path:
    """Load the base in full precision, apply the adapter, merge and unload, and save model + tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from worker.recipes import get_recipe

    studio: dict[str, Any] = json.loads((folder / STUDIO_FILE).read_text(encoding="utf-8"))
    base = resolve_base_model(str(studio["base_model"]))
    base_model = get_recipe(str(studio["task"])).load_base(base, studio, {})
    merged = PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
    merged.config.use_cache = True
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    merged.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(target))
    studio_merged = {key: value for key, value in studio.items() if key != "format"}
    studio_merged.update(format="peft-studio-merged/1", merged_from=str(studio.get("method")))
    (target / STUDIO_FILE).write_text(json.dumps(studio_merged, indent=2), encoding="utf-8")
    return target
