"""Preference-tuning jobs in the web app: spec validation (called from validate_spec) and the training-data preview.

Validation reads every row of the dataset (preference files are small: pairs of answers, not corpora) so that a bad
row is refused before the job is queued, with its number and what is wrong: an answer equal to its rejected twin,
a missing column, a KTO label that is not true or false. The base model is checked as for causal LM.
"""

import asyncio
import difflib
from typing import Any

from sqlmodel import Session

from app.core.base_models import resolve_for_job
from app.core.datasets_io import load_rows
from app.core.errors import InvalidDataset, InvalidSpec, NotFound
from app.core.formats import preference_columns, preference_example_from_row
from app.core.models import Dataset
from app.core.spec import JobSpec
from app.core.storage import get_store
from app.core.tasks import CAUSAL_LM, PREFERENCE
from app.services.adapters import get_adapter
from app.services.causal_lm import _check_model, _dataset
from app.services.datasets import check_validation_split, get_dataset

MAX_PREVIEW_EXAMPLES = 20
PAIR_LOSSES = ("dpo", "ipo", "orpo", "simpo")


def _check_rows(dataset: Dataset, spec: JobSpec, which: str) -> None:
    """The format's columns exist and every row reads as a preference example."""
    settings = spec.preference
    for field, column in preference_columns(settings).items():
        if column not in dataset.columns:
            close = difflib.get_close_matches(column, dataset.columns, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InvalidSpec(
                f"The {settings.format} format reads column {column!r} ({field}), but {which}dataset "
                f"{dataset.id} has only {', '.join(map(repr, dataset.columns))}.{hint}",
                field=field,
            )
    _, rows = load_rows(
        get_store().local_file(dataset.storage_key), dataset.format, dataset.profile.get("import")
    )
    columns = preference_columns(settings)
    for number, row in enumerate(rows, start=1):
        try:
            preference_example_from_row(row, settings, number)
        except InvalidDataset as exc:
            # the field of the column the message names, else the format's first column
            field = next((f for f, c in columns.items() if repr(c) in exc.message), next(iter(columns)))
            raise InvalidSpec(
                f"{(which + 'dataset').capitalize()} {dataset.id}, {exc.message[0].lower()}{exc.message[1:]}",
                field=field,
                row=number,
            ) from None


def _check_continue_from(session: Session, spec: JobSpec, owner_id: int | None) -> None:
    adapter_id = spec.preference.continue_from_adapter_id
    if adapter_id is None:
        return
    field = "preference.continue_from_adapter_id"
    try:
        adapter = get_adapter(session, adapter_id, owner_id)
    except NotFound:
        raise InvalidSpec(f"Adapter {adapter_id} ({field}) does not exist.", field=field) from None
    if adapter.task not in (CAUSAL_LM, PREFERENCE):
        raise InvalidSpec(
            f"Adapter {adapter_id} is a {adapter.task} adapter; a preference job continues a causal-LM (or "
            "preference) adapter.",
            field=field,
        )
    if adapter.base_model != spec.base_model:
        raise InvalidSpec(
            f"Adapter {adapter_id} was trained on {adapter.base_model!r}, not on {spec.base_model!r}; use its "
            "base model.",
            field=field,
        )
    if adapter.method != spec.method:
        raise InvalidSpec(
            f"Adapter {adapter_id} is a {adapter.method} adapter; continuing it trains the same adapter, so set "
            f"method to {adapter.method!r}.",
            field="method",
        )
    from app.core.method_registry import registry

    info = registry().get(spec.method)
    if info is not None and info.saved_as != "peft":
        raise InvalidSpec(
            f"Continuing from an adapter needs a peft adapter; {spec.method} saves {info.saved_as} weights.",
            field=field,
        )


def validate_preference_spec(session: Session, spec: JobSpec, owner_id: int | None = None) -> None:
    """Everything a preference spec refers to: datasets and every row, the loss and the format, the starting
    adapter, the split, the base model."""
    settings = spec.preference
    if settings.loss in PAIR_LOSSES and settings.format == "kto":
        raise InvalidSpec(
            f"The {settings.loss} loss learns from pairs of a chosen and a rejected answer; KTO data (answers "
            "marked good or bad) needs preference.loss kto.",
            field="preference.loss",
        )
    if settings.loss == "kto" and spec.training.batch_size < 2:
        raise InvalidSpec(
            "KTO estimates its KL term from the other answers of a batch: use a batch size of at least 2.",
            field="training.batch_size",
        )
    dataset = _dataset(session, spec.dataset_id, "dataset_id", "", owner_id)
    _check_rows(dataset, spec, "")
    if spec.validation_dataset_id is not None:
        validation = _dataset(
            session, spec.validation_dataset_id, "validation_dataset_id", "validation ", owner_id
        )
        _check_rows(validation, spec, "validation ")
    else:
        check_validation_split(dataset, spec.validation_fraction)
    _check_continue_from(session, spec, owner_id)
    model = resolve_for_job(spec.base_model)
    if model is not None:  # None: the worker downloads it first, and checks it then
        _check_model(model, spec)


async def preview(session: Session, spec: JobSpec, count: int, owner_id: int | None = None) -> dict[str, Any]:
    """The first ``count`` examples as the model will see them: the prompt (masked), chosen and rejected."""
    from app.services.adapters import inference_thread

    validate_preference_spec(session, spec, owner_id)
    dataset = get_dataset(session, spec.dataset_id, owner_id)
    count = max(1, min(count, MAX_PREVIEW_EXAMPLES))

    def run() -> dict[str, Any]:
        from worker.preview import preference_preview  # heavy imports stay out of web start-up

        return preference_preview(spec, dataset, count)

    return await asyncio.get_running_loop().run_in_executor(inference_thread, run)


def starting_point(session: Session, job: Any, owner_id: int | None = None) -> tuple[str, str] | None:
    """The model a preference job started from, for try-out beside it: (OpenAI model name, label) of the
    supervised adapter it continued, or None when it started from the base model."""
    from app.core.models import Adapter, Job
    from app.services.openai_compat import fine_tuned_model_name

    adapter_id = ((job.spec or {}).get(PREFERENCE) or {}).get("continue_from_adapter_id")
    if not adapter_id:
        return None
    start = session.get(Adapter, adapter_id)
    if start is None or (owner_id is not None and start.owner_id != owner_id):
        return None
    start_job = session.get(Job, start.job_id)
    if start_job is None:
        return None
    return fine_tuned_model_name(session, start_job), f"supervised adapter {adapter_id}"
