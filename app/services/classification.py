"""Sequence-classification jobs in the web app: the spec check (``TaskInfo.validate`` of the task).

It reads only the database (the datasets' columns and the profiles stored at upload) and the base model's
config.json, so a bad spec is refused in milliseconds with a message that names the field and the row.
"""

import difflib
from typing import Any

from sqlmodel import Session

from app.core.base_models import resolve_for_job
from app.core.datasets_io import MAX_LABEL_CLASSES
from app.core.errors import InvalidSpec, NotFound
from app.core.models import Dataset
from app.core.spec import JobSpec
from app.services.datasets import check_validation_split, get_dataset

# A label column may have at most this share of the rows as distinct classes (one class per two rows).
MAX_CLASS_SHARE = 0.5
_KIND_NAMES = {
    "string": "text",
    "number": "numbers",
    "bool": "true/false values",
    "object": "objects or arrays",
}


def _column_info(dataset: Dataset, column: str) -> dict[str, Any]:
    info = dataset.profile.get("columns", {}).get(column, {})
    return info if isinstance(info, dict) else {}


def _describe_kinds(info: dict[str, Any]) -> str:
    """E.g. "numbers (3 rows, first row 1) and text (2 rows, first row 4)" for a mixed column."""
    parts = [
        f"{_KIND_NAMES.get(kind, kind)} ({detail['count']} row(s), first row {detail['first_row']})"
        for kind, detail in sorted(info.get("kinds", {}).items(), key=lambda item: item[1]["first_row"])
    ]
    return " and ".join(parts) if parts else "values of different types"


def _rows_from(count: int, first: int | None) -> str:
    """E.g. "3 row(s), first in row 7"; profiles stored before rows were recorded give only the count."""
    return f"{count} row(s)" + (f", first in row {first}" if first else "")


def _missing_column(dataset: Dataset, field: str, column: str, which: str) -> InvalidSpec:
    suggestions = [name for name in dataset.columns if name.lower() == column.lower()]
    suggestions += difflib.get_close_matches(column, dataset.columns, n=1, cutoff=0.6)
    hint = f" Did you mean {suggestions[0]!r}?" if suggestions else ""
    role = field.removesuffix("_column")
    return InvalidSpec(
        f"The {role} column {column!r} ({field}) is not in {which}dataset {dataset.id}; its columns are "
        f"{', '.join(map(repr, dataset.columns))}.{hint}",
        field=field,
    )


def _check_text_column(dataset: Dataset, column: str, which: str) -> None:
    """The text column exists, holds text in every row, and is not just numbers."""
    if column not in dataset.columns:
        raise _missing_column(dataset, "text_column", column, which)
    info = _column_info(dataset, column)
    where = f"The text column {column!r} of {which}dataset {dataset.id}"
    kind = info.get("type")
    if kind == "mixed":
        raise InvalidSpec(
            f"{where} holds {_describe_kinds(info)}; every row needs text.", field="text_column"
        )
    if kind is not None and kind != "string":
        raise InvalidSpec(
            f"{where} holds {_KIND_NAMES.get(kind, kind)}, not text; choose the column with the input "
            "sentences.",
            field="text_column",
        )
    if info.get("missing"):
        raise InvalidSpec(
            f"{where} is empty in {_rows_from(info['missing'], info.get('first_missing_row'))}; "
            "every row needs text. Fill or remove those rows and upload the file again.",
            field="text_column",
        )
    if info.get("numeric") and info["numeric"] == dataset.row_count:
        example = next((row.get(column) for row in dataset.profile.get("preview", [])), None)
        shown = f" (row 1 is {example!r})" if example is not None else ""
        raise InvalidSpec(
            f"{where} holds only numbers{shown}, not text; choose the column with the input sentences.",
            field="text_column",
        )


def _label_names(info: dict[str, Any]) -> set[str]:
    counts = info.get("value_counts")
    if isinstance(counts, dict):
        return set(counts)
    return set(info.get("values") or ())


def _check_label_column(dataset: Dataset, spec: JobSpec, which: str) -> None:
    """The label column exists and every row has a label of one type (labels of mixed types are refused)."""
    column = spec.label_column
    if column not in dataset.columns:
        raise _missing_column(dataset, "label_column", column, which)
    info = _column_info(dataset, column)
    where = f"The label column {column!r} of {which}dataset {dataset.id}"
    if info.get("missing"):
        raise InvalidSpec(
            f"{where} is empty in {_rows_from(info['missing'], info.get('first_missing_row'))}; "
            "every row needs a label. Fill or remove those rows and upload the file again.",
            field="label_column",
        )
    kind = info.get("type")
    if kind == "mixed":
        # 1 and "1" would become one class, 1 and "pos" two classes of different types: ask for one type.
        raise InvalidSpec(
            f"{where} mixes {_describe_kinds(info)}; write every label the same way (all text, "
            'e.g. "pos"/"neg", or all numbers).',
            field="label_column",
        )
    if kind == "object":
        raise InvalidSpec(
            f"{where} holds objects or arrays; a label must be one text, number or true/false value.",
            field="label_column",
        )


def _check_classes(dataset: Dataset, spec: JobSpec) -> set[str]:
    """At least 2 classes, at most 100, each repeated: returns the label names."""
    info = _column_info(dataset, spec.label_column)
    classes = info.get("distinct", 0)
    where = f"The label column {spec.label_column!r} of dataset {dataset.id}"
    if classes < 2:
        only = f" (every row is {info['values'][0]!r})" if classes == 1 and info.get("values") else ""
        raise InvalidSpec(
            f"{where} has {classes} distinct value{'' if classes == 1 else 's'}{only}; classification needs "
            "at least 2 classes.",
            field="label_column",
        )
    if "value_counts" not in info:
        raise InvalidSpec(
            f"{where} has {classes} distinct values in {dataset.row_count} rows: it does not look like a "
            f"label column (2 to {MAX_LABEL_CLASSES} classes, each on several rows). Is it the text column?",
            field="label_column",
        )
    if dataset.row_count >= 10 and classes > MAX_CLASS_SHARE * dataset.row_count:
        # A classifier learns a class from several examples of it; one class per row or two is an id or a text.
        others = [
            name
            for name, other in dataset.profile.get("columns", {}).items()
            if name != spec.label_column
            and other.get("value_counts")
            and other.get("distinct", 0) <= MAX_CLASS_SHARE * dataset.row_count
        ]
        hint = f" Columns that look like labels: {', '.join(map(repr, others))}." if others else ""
        raise InvalidSpec(
            f"{where} has {classes} distinct values in {dataset.row_count} rows ({classes / dataset.row_count:.0%} "
            f"of the rows): too many classes for this much data, each class needs several examples (at most "
            f"{MAX_CLASS_SHARE:.0%} of the rows may be distinct classes). Choose the column that holds the "
            f"class.{hint}",
            field="label_column",
        )
    return _label_names(info)


def _get_dataset(
    session: Session, dataset_id: int, field: str, which: str, owner_id: int | None = None
) -> Dataset:
    try:
        return get_dataset(session, dataset_id, owner_id)
    except NotFound:
        raise InvalidSpec(
            f"The {which}dataset {dataset_id} ({field}) does not exist; upload it first or pick one from "
            "GET /api/v1/datasets.",
            field=field,
        ) from None


def _check_classification_data(dataset: Dataset, validation: Dataset | None, spec: JobSpec) -> None:
    """Text and label columns of the training (and validation) data fit a classification job."""
    if spec.text_column == spec.label_column:
        raise InvalidSpec(
            f"text_column and label_column are both {spec.label_column!r}; the label must be another column.",
            field="label_column",
        )
    text_columns = spec.text_columns or [spec.text_column]
    if spec.label_column in text_columns:
        raise InvalidSpec(
            f"text_columns include the label column {spec.label_column!r}; the label must not be in the input.",
            field="text_columns",
        )
    for column in text_columns:
        _check_text_column(dataset, column, "")
    _check_label_column(dataset, spec, "")
    labels = _check_classes(dataset, spec)
    if validation is None:
        return
    for column in text_columns:
        _check_text_column(validation, column, "validation ")
    _check_label_column(validation, spec, "validation ")
    unseen = sorted(_label_names(_column_info(validation, spec.label_column)) - labels)
    if unseen:
        raise InvalidSpec(
            f"Validation dataset {validation.id} has label(s) {', '.join(map(repr, unseen[:10]))} that never "
            f"occur in training dataset {dataset.id} (its labels: {', '.join(map(repr, sorted(labels)))}).",
            field="validation_dataset_id",
        )


def validate_classification_spec(session: Session, spec: JobSpec, owner_id: int | None = None) -> None:
    """Everything a classification spec refers to: datasets and their text and label columns, the split, the
    base model's length."""
    dataset = _get_dataset(session, spec.dataset_id, "dataset_id", "", owner_id)
    validation = None
    if spec.validation_dataset_id is not None:
        validation = _get_dataset(
            session, spec.validation_dataset_id, "validation_dataset_id", "validation ", owner_id
        )
    _check_classification_data(dataset, validation, spec)
    if validation is None:
        check_validation_split(dataset, spec.validation_fraction)
    model = resolve_for_job(spec.base_model)  # None: the worker downloads it first, and checks it then
    if (
        model is not None
        and model.max_positions is not None
        and spec.training.max_length > model.max_positions
    ):
        raise InvalidSpec(
            f"training.max_length {spec.training.max_length} is beyond what {spec.base_model!r} accepts; "
            f"use at most {model.max_positions} (its position embeddings).",
            field="training.max_length",
        )
