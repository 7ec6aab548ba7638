"""Reading a classification dataset into label-encoded, tokenized training and validation examples."""

import random
from dataclasses import dataclass
from typing import Any

from app.core.datasets_io import load_rows
from app.core.errors import InvalidDataset
from app.core.models import Dataset
from app.core.spec import JobSpec
from app.core.storage import get_store
from worker.batching import install as install_length_grouping


@dataclass
class ClassificationData:
    """Texts and label ids for training and validation, with the label names in id order."""

    labels: list[str]
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]


def _texts_and_labels(dataset: Dataset, spec: JobSpec) -> tuple[list[str], list[str]]:
    _, rows = load_rows(
        get_store().local_file(dataset.storage_key), dataset.format, dataset.profile.get("import")
    )
    texts: list[str] = []
    labels: list[str] = []
    columns = spec.text_columns or [spec.text_column]
    for number, row in enumerate(rows, start=1):
        for column in columns:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                raise InvalidDataset(f"Row {number} of dataset {dataset.id}: column {column!r} has no text.")
        # Several text columns (title, description) are joined one per line: the tokenizer reads it as a space.
        text = "\n".join(str(row[column]).strip() for column in columns)
        label = row.get(spec.label_column)
        if label is None or label == "":
            raise InvalidDataset(
                f"Row {number} of dataset {dataset.id}: column {spec.label_column!r} is empty."
            )
        texts.append(text)
        labels.append(str(label))
    return texts, labels


def _ordered_label_names(names: set[str]) -> list[str]:
    """Integer labels in numeric order (so "0" stays id 0), any others alphabetically."""
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def classification_data(spec: JobSpec, train: Dataset, validation: Dataset | None) -> ClassificationData:
    """Read, split (seeded) and label-encode the data for a classification job."""
    install_length_grouping()  # length-grouped batches that group small datasets too (worker/batching.py)
    texts, labels = _texts_and_labels(train, spec)
    if validation is not None:
        eval_texts, eval_label_names = _texts_and_labels(validation, spec)
    elif spec.validation_fraction > 0:
        order = list(range(len(texts)))
        random.Random(spec.training.seed).shuffle(order)
        held_out = set(order[: round(len(texts) * spec.validation_fraction)])
        eval_texts = [texts[i] for i in sorted(held_out)]
        eval_label_names = [labels[i] for i in sorted(held_out)]
        texts = [texts[i] for i in range(len(texts)) if i not in held_out]
        labels = [labels[i] for i in range(len(labels)) if i not in held_out]
    else:
        eval_texts, eval_label_names = [], []
    names = _ordered_label_names(set(labels))
    unseen = sorted(set(eval_label_names) - set(names))
    if unseen:
        raise InvalidDataset(
            f"The validation data has label(s) {', '.join(map(repr, unseen))} that never occur in training."
        )
    index = {name: i for i, name in enumerate(names)}
    return ClassificationData(
        labels=names,
        train_texts=texts,
        train_labels=[index[name] for name in labels],
        eval_texts=eval_texts,
        eval_labels=[index[name] for name in eval_label_names],
    )


def tokenize(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> list[dict[str, Any]]:
    """Tokenize once, without padding: the collator pads each batch only to its longest example."""
    if not texts:
        return []  # no validation split (fraction 0): the tokenizer refuses an empty batch
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels, strict=True)
    ]
