"""Try-out inference: the base model stays warm, adapters are switched onto it, never reloaded.

Used by the web app on its dedicated inference thread (one thread, so no locking is needed here).
"""

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from app.core.base_models import resolve_base_model
from app.core.settings import get_settings
from worker.methods import BuildContext, get_method, load_peft_adapter
from worker.recipes import get_recipe

STUDIO_FILE = "studio.json"


class WarmModels:
    """A small LRU of base models with the adapters loaded onto each, by adapter id."""

    def __init__(self) -> None:
        self.models: OrderedDict[tuple[str, str, int, str], Any] = OrderedDict()
        self.loaded: dict[tuple[str, str, int, str], set[str]] = {}
        self.tokenizers: dict[str, Any] = {}
        self.described: dict[str, tuple[int, tuple[dict[str, Any], Any, Any, dict[str, Any]]]] = {}
        self.base_loads = 0

    def _describe(self, folder: Path) -> tuple[dict[str, Any], Any, Any, dict[str, Any]]:
        """studio.json, base model, method and load kwargs of an adapter folder, read once per folder version."""
        stamp = (folder / STUDIO_FILE).stat().st_mtime_ns
        cached = self.described.get(str(folder))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        studio = json.loads((folder / STUDIO_FILE).read_text(encoding="utf-8"))
        base = resolve_base_model(studio["base_model"])
        method = get_method(studio["method"])
        settings = method.config.model_validate(studio["spec"]["method_config"])
        load_kwargs = method.load_kwargs(settings, BuildContext(task=studio["task"]))
        described = (studio, base, method, load_kwargs)
        self.described[str(folder)] = (stamp, described)
        return described

    @torch.inference_mode()
    def model_for(self, adapter_id: int, folder: Path) -> tuple[Any, Any, dict[str, Any]]:
        """The warm model with this adapter active, its tokenizer and the adapter's studio.json.

        Always in inference mode: weights loaded there are inference tensors, and peft's ``set_adapter``
        (which sets ``requires_grad``) would refuse them if a later call came from outside inference mode.
        """
        studio, base, method, load_kwargs = self._describe(folder)
        labels = studio["labels"]
        # Adapters of one peft method share one warm base (peft cannot mix adapter types in one model); others
        # (full fine-tuning, our own adapters, a quantized base) get a model of their own, keyed by folder.
        shared = method.load is load_peft_adapter and not load_kwargs
        key = (
            (str(base.path), studio["task"], len(labels), method.name)
            if shared
            else (str(folder), studio["task"], -1, method.name)
        )
        name = f"adapter_{adapter_id}"
        if key not in self.models:
            capacity = get_settings().inference_cache_size
            while len(self.models) >= capacity:
                old_key, _ = self.models.popitem(last=False)
                self.loaded.pop(old_key, None)
            base_model = get_recipe(studio["task"]).load_base(base, studio, load_kwargs)
            self.base_loads += 1
            model = method.load(base_model, str(folder), name)
            model.eval()
            self.models[key] = model
            self.loaded[key] = {name}
        model = self.models[key]
        self.models.move_to_end(key)
        if name not in self.loaded[key]:
            model.load_adapter(str(folder), adapter_name=name)
            self.loaded[key].add(name)
        if shared and getattr(model, "active_adapter", None) != name:
            model.set_adapter(name)  # walks every adapted layer: only when the adapter really changes
        if str(folder) not in self.tokenizers:
            self.tokenizers[str(folder)] = AutoTokenizer.from_pretrained(str(folder))
        return model, self.tokenizers[str(folder)], studio


WARM = WarmModels()


@torch.inference_mode()
def classify(adapter_id: int, folder: Path, texts: list[str]) -> list[dict[str, Any]]:
    """Predicted label and class probabilities for each text."""
    model, tokenizer, studio = WARM.model_for(adapter_id, folder)
    labels: list[str] = studio["labels"]
    batch = tokenizer(
        texts, truncation=True, max_length=studio.get("max_length", 512), padding=True, return_tensors="pt"
    )
    probabilities = torch.softmax(model(**batch).logits.float(), dim=-1).tolist()
    return [
        {
            "label": labels[max(range(len(row)), key=row.__getitem__)],
            "probabilities": {label: float(p) for label, p in zip(labels, row, strict=True)},
        }
        for row in probabilities
    ]
