"""What a saved adapter folder says about itself: a model card (README.md) and, for classifiers, its labels.

peft's ``save_pretrained`` writes an empty model-card template; the card written here after it says what the
adapter is (base model, method, data, metrics, labels) and how to load it outside the studio.

Labels: ``AutoPeftModelForSequenceClassification.from_pretrained(folder)`` builds the base model from
``base_model_name_or_path`` in adapter_config.json alone, so without ``num_labels`` a classifier of more than two
classes does not load and every class is called ``LABEL_<n>`` (huggingface/peft#1486). A *labelled base* fixes
that without copying weights: a folder in the studio's data folder holding the base's config.json with
``id2label``/``label2id`` and a safetensors index whose entries point at the base model's own weight files.
adapter_config.json then names that folder. The studio itself loads adapters from studio.json (the real base
model), so nothing else changes.
"""

import hashlib
import json
import logging
from pathlib import Path

from app.core.settings import get_settings
from app.core.spec import JobSpec
from app.core.tasks import CLASSIFICATION
from worker.best import metric_for

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def _weight_map(base: Path) -> dict[str, str] | None:
    """Tensor name -> absolute weight file of a safetensors base model (None if it has no safetensors)."""
    index = base / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: str((base / file).resolve()) for name, file in weight_map.items()}
    single = base / "model.safetensors"
    if not single.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as weights:
        return {name: str(single.resolve()) for name in weights.keys()}  # noqa: SIM118 - not a dict


def labelled_base(base: Path, labels: list[str]) -> Path | None:
    """A folder that loads as ``base`` with a head of ``labels`` (see the module notes); None if it cannot."""
    weight_map = _weight_map(base)
    if weight_map is None:
        return None
    digest = hashlib.sha256(json.dumps([str(base.resolve()), labels]).encode()).hexdigest()[:16]
    folder = get_settings().data_dir / "labelled-bases" / digest
    if (folder / INDEX_FILE).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config.update(
        num_labels=len(labels),
        id2label={str(i): name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    index = {"metadata": {"labelled_base_of": str(base.resolve())}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")  # last: it marks the folder done
    return folder


def point_at_labelled_base(folder: Path, base: Path, labels: list[str]) -> None:
    """Make a peft classifier folder load with its labels through peft's auto classes (no-op for others)."""
    adapter_config = folder / "adapter_config.json"
    if not labels or not adapter_config.exists():
        return
    try:
        labelled = labelled_base(base, labels)
    except (OSError, ValueError) as error:  # the adapter still loads with num_labels; say why it could not
        log.warning("no labelled base for %s: %s", base, error)
        return
    if labelled is None:
        return
    config = json.loads(adapter_config.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(labelled)
    adapter_config.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _metrics_table(metrics: dict[str, float]) -> str:
    shown = {
        k: v
        for k, v in metrics.items()
        if not any(part in k for part in ("runtime", "per_second", "tokens_seen"))
    }
    if not shown:
        return "No held-out evaluation (the job held out no rows).\n"
    rows = "\n".join(f"| {name} | {value:.3f} |" for name, value in sorted(shown.items()))
    return f"| metric (held-out) | value |\n| --- | --- |\n{rows}\n"


def _how_to_load(spec: JobSpec, saved_as: str, labels: list[str]) -> str:
    if saved_as == "transformers":
        auto = "AutoModelForSequenceClassification" if labels else "AutoModelForCausalLM"
        return f"from transformers import {auto}\n\nmodel = {auto}.from_pretrained(folder)"
    if saved_as == "studio":
        return (
            "from studio_adapters import load_adapter  # the file next to this card\n\n"
            "model = load_adapter(base_model, folder)"
        )
    if spec.task == CLASSIFICATION:
        return (
            "from peft import AutoPeftModelForSequenceClassification\n\n"
            "model = AutoPeftModelForSequenceClassification.from_pretrained(folder)  # labels included"
        )
    return "from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained(folder)"


def write_model_card(
    folder: Path,
    spec: JobSpec,
    method_title: str,
    saved_as: str,
    labels: list[str],
    metrics: dict[str, float] | None,
    dataset_name: str | None = None,
) -> None:
    """Write README.md: base model, method, data, metrics, labels and how to load (replaces peft's template)."""
    training = spec.training
    name = spec.name or f"{spec.method} on dataset {spec.dataset_id}"
    data = dataset_name or f"dataset {spec.dataset_id}"
    held_out = (
        f"dataset {spec.validation_dataset_id}"
        if spec.validation_dataset_id
        else f"{spec.validation_fraction:.0%} of the training rows, held out"
    )
    label_lines = "\n".join(f"| {i} | {label} |" for i, label in enumerate(labels))
    label_section = (
        f"## Labels\n\n| id | label |\n| --- | --- |\n{label_lines}\n\n"
        "`config.id2label` / `config.label2id` carry the same mapping.\n\n"
        if labels
        else ""
    )
    auto = ", ".join(training.auto_fields) or "none"
    metric = metric_for(training.best_metric, spec.task)
    kept = (
        f"The weights are those of the best held-out evaluation by {metric} (docs/defaults.md)."
        if metric and (spec.validation_dataset_id or spec.validation_fraction)
        else "The weights are those of the last training step."
    )
    card = f"""---
library_name: {"peft" if saved_as == "peft" else "transformers"}
base_model: {spec.base_model}
tags:
- peft-studio
- {spec.method}
- {spec.task}
---

# {name}

A {method_title} ({spec.method}) fine-tune of `{spec.base_model}` for {spec.task}, trained with PEFT Studio.

## Data

- Training: {data}{f", text column `{spec.text_column}`, label column `{spec.label_column}`" if labels else ""}
- Evaluation: {held_out}

## Metrics

{_metrics_table(metrics or {})}
{kept}

{label_section}## Training

| setting | value |
| --- | --- |
| epochs | {training.num_epochs} |
| max steps | {training.max_steps} |
| batch size | {training.batch_size} |
| learning rate | {training.learning_rate} |
| warm-up ratio | {training.warmup_ratio} |
| max length | {training.max_length} |
| seed | {training.seed} |

Chosen by the studio's `auto` rule: {auto}. The full spec is in `studio.json`.

## How to load

```python
folder = "path/to/this/folder"
base_model = "{spec.base_model}"
{_how_to_load(spec, saved_as, labels)}
```
"""
    (folder / "README.md").write_text(card, encoding="utf-8")
