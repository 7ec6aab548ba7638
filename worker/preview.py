"""The training-data preview: the first examples of a causal-LM job rendered and tokenized exactly as in training.

Runs on the web app's inference thread (app/services/causal_lm.py) with the worker's own encoder, so what the
page shows is what the model trains on: the same template, BOS/EOS handling, truncation and loss mask.
"""

from typing import Any

from app.core.chat_templates import resolve_template
from app.core.datasets_io import load_rows
from app.core.formats import example_from_row
from app.core.models import Dataset
from app.core.spec import JobSpec
from app.core.storage import get_store
from worker.recipes.causal_lm_data import IGNORE, EncodedExample, Encoder, held_out_rows, load_tokenizer

_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str) -> Any:
    """A fresh copy per call would cost seconds on big vocabularies; keep the last few."""
    if path not in _TOKENIZERS:
        if len(_TOKENIZERS) >= 4:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def spans(tokenizer: Any, example: EncodedExample) -> list[dict[str, Any]]:
    """Runs of consecutive tokens that are all masked or all trained, with their text and token pieces."""
    runs: list[dict[str, Any]] = []
    for token_id, label in zip(example.input_ids, example.labels, strict=True):
        masked = label == IGNORE
        if not runs or runs[-1]["masked"] != masked:
            runs.append({"masked": masked, "ids": []})
        runs[-1]["ids"].append(token_id)
    return [
        {
            "masked": run["masked"],
            "text": tokenizer.decode(run["ids"], skip_special_tokens=False),
            "tokens": [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in run["ids"]],
            "token_ids": run["ids"],
        }
        for run in runs
    ]


def preview_examples(spec: JobSpec, dataset: Dataset, count: int) -> dict[str, Any]:
    """The first ``count`` training rows (after the held-out split) as token spans with a ``masked`` flag."""
    tokenizer = _tokenizer(str(_base_path(spec)))
    settings = spec.causal_lm
    template_name: str | None
    template: str | None
    template_name, template = resolve_template(settings.template, tokenizer.chat_template)
    if settings.format == "text":
        template_name, template = None, None
    encoder = Encoder(tokenizer, template, spec.training.max_length, settings.train_on_prompt)
    _, rows = load_rows(
        get_store().local_file(dataset.storage_key), dataset.format, dataset.profile.get("import")
    )
    held_out: set[int] = set()
    if spec.validation_dataset_id is None and spec.validation_fraction > 0:
        held_out = held_out_rows(len(rows), spec.validation_fraction, spec.training.seed)
    examples: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        if len(examples) >= count:
            break
        if index in held_out:
            continue
        example = example_from_row(row, spec.causal_lm, spec.text_column, index + 1)
        for encoded in encoder.encode(example, index + 1):
            if len(examples) >= count:
                break
            examples.append(
                {
                    "row": index + 1,
                    "tokens": len(encoded.input_ids),
                    "trained_tokens": sum(1 for label in encoded.labels if label != IGNORE),
                    "truncated": encoded.truncated,
                    # Training skips an example whose response was cut off entirely by max_length.
                    "dropped": all(label == IGNORE for label in encoded.labels),
                    "spans": spans(tokenizer, encoded),
                }
            )
    return {
        "dataset_id": dataset.id,
        "format": spec.causal_lm.format,
        "template": template_name,
        "chat_template": template,
        "train_on_prompt": spec.causal_lm.train_on_prompt,
        "packing": spec.causal_lm.packing,
        "max_length": spec.training.max_length,
        "examples": examples,
    }


def _base_path(spec: JobSpec) -> Any:
    from app.core.base_models import resolve_base_model

    return resolve_base_model(spec.base_model).path


def _answer_tokens(tokenizer: Any, text: str, room: int) -> dict[str, Any]:
    """An answer's token pieces, and how many of them fit in the room max length leaves after the prompt."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return {
        "text": text,
        "tokens": [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids],
        "token_ids": ids,
        "kept": max(0, min(len(ids), room)),
        "truncated": len(ids) > room,
    }


def preference_preview(spec: JobSpec, dataset: Dataset, count: int) -> dict[str, Any]:
    """The first ``count`` training examples of a preference job as trl gets them: the prompt with the chat
    template applied (masked: no loss), the chosen and rejected answers side by side (or KTO's answer and its
    label), each with the tokens that max length cuts off marked."""
    from worker.recipes.preference_data import (
        PreferenceRenderer,
        held_out,
        read_preference_examples,
        unpaired,
    )

    tokenizer = _tokenizer(str(_base_path(spec)))  # shared: its own chat template stays as it is
    template_name, template = resolve_template(spec.preference.template, tokenizer.chat_template)
    renderer = PreferenceRenderer(tokenizer, template, spec.training.max_length)
    examples = read_preference_examples(dataset, spec)
    if spec.validation_dataset_id is None and spec.validation_fraction > 0:
        held = held_out(len(examples), spec.validation_fraction, spec.training.seed)
        examples = [example for index, example in enumerate(examples) if index not in held]
    if spec.preference.loss == "kto":
        examples = unpaired(examples)
    shown: list[dict[str, Any]] = []
    for row, example in examples[:count]:
        rendered = renderer.render(example, row)
        prompt_ids = list(tokenizer(rendered.prompt, add_special_tokens=True)["input_ids"])
        room = spec.training.max_length - len(prompt_ids)
        item: dict[str, Any] = {
            "row": row,
            "tokens": rendered.prompt_tokens + max(rendered.answer_tokens),
            "trained_tokens": sum(min(room, tokens) for tokens in rendered.answer_tokens if room > 0),
            "truncated": rendered.truncated,
            "dropped": room <= 0,
            "spans": [
                {
                    "masked": True,
                    "text": rendered.prompt,
                    "tokens": [tokenizer.decode([i], skip_special_tokens=False) for i in prompt_ids],
                    "token_ids": prompt_ids,
                }
            ],
            "prompt": rendered.prompt,
        }
        if rendered.completion is not None:
            item["completion"] = _answer_tokens(tokenizer, rendered.completion, room)
            item["label"] = rendered.label
        else:
            item["chosen"] = _answer_tokens(tokenizer, rendered.chosen or "", room)
            item["rejected"] = _answer_tokens(tokenizer, rendered.rejected or "", room)
        shown.append(item)
    return {
        "dataset_id": dataset.id,
        "task": spec.task,
        "format": spec.preference.format,
        "loss": spec.preference.loss,
        "template": template_name,
        "chat_template": template,
        "train_on_prompt": False,
        "packing": "off",  # preference pairs are never packed
        "max_length": spec.training.max_length,
        "examples": shown,
    }
