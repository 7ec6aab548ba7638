"""Causal-LM jobs in the web app: spec validation (called from validate_spec) and the training-data preview.

Validation reads only the database (the dataset's columns and profile) and the base model's config.json, so a
bad spec is refused in milliseconds with a message that names the field. The preview loads the tokenizer and
renders examples through the worker's own code on the inference thread.
"""

import asyncio
import difflib
from typing import Any

from sqlmodel import Session

from app.core.base_models import ResolvedModel, resolve_for_job
from app.core.errors import InvalidDataset, InvalidSpec, NotFound
from app.core.formats import example_from_row, required_columns
from app.core.method_registry import registry as method_registry
from app.core.models import Dataset
from app.core.spec import JobSpec
from app.core.tasks import CAUSAL_LM
from app.services.datasets import check_validation_split, get_dataset

# Architectures whose class name ends like this have a language-model head that generates text.
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
MAX_PREVIEW_EXAMPLES = 20


def _dataset(
    session: Session, dataset_id: int, field: str, which: str, owner_id: int | None = None
) -> Dataset:
    try:
        return get_dataset(session, dataset_id, owner_id)
    except NotFound:
        raise InvalidSpec(f"The {which}dataset {dataset_id} ({field}) does not exist.", field=field) from None


def _check_columns(dataset: Dataset, spec: JobSpec, which: str) -> None:
    """The format's columns exist, hold what the format needs, and the first rows read as examples."""
    settings = spec.causal_lm
    profile: dict[str, Any] = dataset.profile.get("columns", {})
    for field, column in required_columns(settings, spec.text_column).items():
        if column not in dataset.columns:
            close = difflib.get_close_matches(column, dataset.columns, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            optional = " (set it empty if the data has none)" if field == "causal_lm.input_column" else ""
            raise InvalidSpec(
                f"The {settings.format} format reads column {column!r} ({field}{optional}), but {which}dataset "
                f"{dataset.id} has only {', '.join(map(repr, dataset.columns))}.{hint}",
                field=field,
            )
        info = profile.get(column, {})
        missing = int(info.get("missing", 0) or 0)
        if missing and field != "causal_lm.input_column":
            first = info.get("first_missing_row")
            raise InvalidSpec(
                f"Column {column!r} ({field}) of {which}dataset {dataset.id} is empty in {missing} of "
                f"{dataset.row_count} rows{f' (first: row {first})' if first else ''}; every example needs it.",
                field=field,
                row=first if isinstance(first, int) else None,
            )
        expected = "object" if field == "causal_lm.messages_column" else "string"
        kind = info.get("type")
        if kind not in (expected, "missing", None) and not (expected == "string" and kind == "number"):
            what = "a list of {role, content} messages" if expected == "object" else "text"
            raise InvalidSpec(
                f"Column {column!r} ({field}) of {which}dataset {dataset.id} holds {kind} values; the "
                f"{settings.format} format needs {what} there.",
                field=field,
            )
    field = next(iter(required_columns(settings, spec.text_column)))
    for number, row in enumerate(dataset.profile.get("preview", []), start=1):
        try:
            example_from_row(row, settings, spec.text_column, number)
        except InvalidDataset as exc:
            raise InvalidSpec(
                f"{which.capitalize()}dataset {dataset.id}: {exc.message}", field=field
            ) from None


def _check_model(model: ResolvedModel, spec: JobSpec) -> None:
    architectures = model.config.get("architectures") or []
    if architectures and not any(str(name).endswith(_GENERATIVE_SUFFIXES) for name in architectures):
        raise InvalidSpec(
            f"Base model {spec.base_model!r} is a {architectures[0]}, which has no language-model head; "
            "causal-LM jobs need a generative model (e.g. a Llama, Qwen or GPT-2 folder, or one made with "
            "`peft-studio make-tiny-lm PATH`).",
            field="base_model",
        )
    if model.max_positions is not None and spec.training.max_length > model.max_positions:
        raise InvalidSpec(
            f"training.max_length {spec.training.max_length} is beyond what {spec.base_model!r} accepts; "
            f"use at most {model.max_positions} (its position embeddings).",
            field="training.max_length",
        )


def _adds_virtual_tokens(method: str) -> bool:
    info = method_registry().get(method)
    return info is not None and info.virtual_tokens


def validate_causal_lm_spec(session: Session, spec: JobSpec, owner_id: int | None = None) -> None:
    """Everything a causal-LM spec refers to: datasets and their columns, the split, the base model.

    ``label_column`` is not used by causal-LM jobs and is not checked.
    """
    dataset = _dataset(session, spec.dataset_id, "dataset_id", "", owner_id)
    _check_columns(dataset, spec, "")
    if spec.validation_dataset_id is not None:
        validation = _dataset(
            session, spec.validation_dataset_id, "validation_dataset_id", "validation ", owner_id
        )
        _check_columns(validation, spec, "validation ")
    else:
        check_validation_split(dataset, spec.validation_fraction)
    # A method's virtual tokens (or prefix key/values) join every sequence: packed examples would share them.
    if spec.causal_lm.packing in ("on", "rows") and _adds_virtual_tokens(spec.method):
        raise InvalidSpec(
            f"Packing cannot be used with {spec.method}: its virtual tokens (or prefix key/values) would be "
            "shared by every example packed in a row. Set packing to off or auto for this method.",
            field="causal_lm.packing",
        )
    model = resolve_for_job(spec.base_model)
    if model is not None:  # None: the worker downloads it first, and checks it then
        _check_model(model, spec)


async def preview(session: Session, spec: JobSpec, count: int, owner_id: int | None = None) -> dict[str, Any]:
    """The first ``count`` training examples as the model will see them, as token spans marked masked or not."""
    from app.services.adapters import inference_thread

    if spec.task != CAUSAL_LM:
        raise InvalidSpec("The training-data preview is for causal-LM jobs (task causal-lm).", field="task")
    validate_causal_lm_spec(session, spec, owner_id)
    dataset = get_dataset(session, spec.dataset_id, owner_id)
    count = max(1, min(count, MAX_PREVIEW_EXAMPLES))

    def run() -> dict[str, Any]:
        from worker.preview import preview_examples  # heavy imports stay out of web start-up

        return preview_examples(spec, dataset, count)

    return await asyncio.get_running_loop().run_in_executor(inference_thread, run)
