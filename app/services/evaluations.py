"""Evaluations: run an adapter over a dataset file on a worker, then read its metrics and predictions.

The request is checked here against the stored dataset profile (columns, label values), so a queued
evaluation does not fail on a typo; the worker (worker/evaluation.py) reads the file and computes. Every row
carries the adapter's owner, whoever started it (the admin may evaluate anyone's adapter), so the owner sees
it beside the adapter.
"""

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, func, select

from app.core.errors import InvalidSpec, NotFound, ServiceUnavailable
from app.core.models import (
    Adapter,
    Dataset,
    Evaluation,
    EvaluationPublic,
    EvaluationStatus,
    Job,
)
from app.core.spec import DEFAULT_BETA, CausalLMSettings, JobSpec, PreferenceSettings
from app.core.storage import get_store
from app.core.tasks import CAUSAL_LM, CLASSIFICATION, PREFERENCE
from app.services.adapters import get_adapter
from app.services.datasets import get_dataset

EVALUATE_TASK = "peft_studio.evaluate_adapter"
PREDICTIONS_FILE = "predictions.csv"
CHUNK_BYTES = 256 * 1024


class EvaluationCreate(BaseModel):
    """What to evaluate on: a dataset and which of its columns to read.

    Classification: ``text_column`` and ``label_column`` default to the columns the adapter was trained on;
    a label column that the file lacks (when not named), or ``label_column: null``, gives predictions only.
    Causal LM: ``causal_lm`` (format and columns) defaults to the adapter's training settings.
    Preference: ``preference`` (format and columns) defaults to what the dataset's upload detected (pairs or
    KTO data); a dataset that is neither is refused.
    """

    model_config = ConfigDict(extra="forbid")

    dataset_id: int = Field(gt=0, description="The dataset (file) to run the adapter over.")
    text_column: str | None = Field(
        default=None, min_length=1, max_length=200, description="Column with the input text."
    )
    text_columns: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="Classification: several text columns joined one per line, as in training; default: the "
        "adapter's training text_columns when it had them.",
    )
    label_column: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Column with the true labels; null for predictions only (batch prediction).",
    )
    causal_lm: CausalLMSettings | None = Field(
        default=None, description="Causal-LM adapters: the data format and its columns."
    )
    preference: PreferenceSettings | None = Field(
        default=None,
        description="Preference adapters: the data format (pairs or kto) and its columns; default: the format "
        "and columns detected on upload (template and system prompt: the adapter's training ones).",
    )
    samples: int = Field(
        default=5, ge=0, le=20, description="Causal LM: how many examples get a generated (greedy) response."
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=256, description="Causal LM: the most tokens generated per sample."
    )


def evaluation_public(evaluation: Evaluation) -> EvaluationPublic:
    """The public shape of an evaluation."""
    return EvaluationPublic.model_validate(
        evaluation, update={"has_predictions": bool(evaluation.predictions_key)}
    )


def training_spec(session: Session, adapter: Adapter) -> JobSpec | None:
    """The spec of the job that trained the adapter (None for an imported adapter or a deleted job)."""
    job = session.get(Job, adapter.job_id)
    if job is None:
        return None
    try:
        return JobSpec.model_validate(job.spec)
    except ValueError:  # a spec stored by an older version that no longer validates: no defaults from it
        return None


def _column_info(dataset: Dataset, column: str) -> dict[str, Any]:
    info = dataset.profile.get("columns", {}).get(column, {})
    return info if isinstance(info, dict) else {}


def _require_column(dataset: Dataset, field: str, column: str) -> None:
    if column not in dataset.columns:
        raise InvalidSpec(
            f"Column {column!r} ({field}) is not in dataset {dataset.id}; its columns are "
            f"{', '.join(map(repr, dataset.columns))}.",
            field=field,
        )


def _classification_settings(
    dataset: Dataset, adapter: Adapter, body: EvaluationCreate, trained: JobSpec | None
) -> dict[str, Any]:
    """The text and label columns to read, checked against the dataset's profile and the adapter's labels."""
    if body.text_columns or body.text_column:
        text_columns = body.text_columns or [body.text_column or ""]
    elif trained is not None:
        text_columns = trained.text_columns or [trained.text_column]
    else:
        raise InvalidSpec("Name the column with the input text (text_column).", field="text_column")
    field = "text_columns" if len(text_columns) > 1 or body.text_columns else "text_column"
    for text_column in text_columns:
        _require_column(dataset, field, text_column)
        info = _column_info(dataset, text_column)
        kind = info.get("type")
        only_numbers = kind == "string" and info.get("numeric") == dataset.row_count
        if kind not in (None, "string", "missing") or only_numbers:
            raise InvalidSpec(
                f"Column {text_column!r} ({field}) of dataset {dataset.id} holds "
                f"{'only numbers' if only_numbers else f'{kind} values'}, not text; choose the column with "
                "the input sentences.",
                field=field,
            )
    if "label_column" in body.model_fields_set:
        label_column = body.label_column  # named, or explicitly null: predictions only
        if label_column is not None:
            _require_column(dataset, "label_column", label_column)
    else:
        # Not named: the training label column when the file has it (a test split), else predictions only.
        guess = trained.label_column if trained else None
        label_column = guess if guess in dataset.columns and guess not in text_columns else None
    if label_column is not None:
        if label_column in text_columns:
            raise InvalidSpec(
                f"The label column {label_column!r} is also a text column; the label must be another column.",
                field="label_column",
            )
        info = _column_info(dataset, label_column)
        if info.get("missing"):
            raise InvalidSpec(
                f"Column {label_column!r} (label_column) of dataset {dataset.id} is empty in {info['missing']} "
                "row(s); every row needs a label, or leave label_column out for predictions only.",
                field="label_column",
            )
        values = info.get("value_counts") or {name: 0 for name in info.get("values") or ()}
        unknown = sorted(set(values) - set(adapter.labels))
        if unknown:
            raise InvalidSpec(
                f"Column {label_column!r} (label_column) of dataset {dataset.id} has label(s) "
                f"{', '.join(map(repr, unknown[:10]))} that adapter {adapter.id} does not know (its labels: "
                f"{', '.join(map(repr, adapter.labels))}).",
                field="label_column",
            )
    return {
        "text_column": text_columns[0],
        "text_columns": text_columns,
        "label_column": label_column,
    }


def _causal_settings(dataset: Dataset, body: EvaluationCreate, trained: JobSpec | None) -> dict[str, Any]:
    """The causal-LM format and columns (the adapter's training ones unless given), checked on the profile."""
    from app.services.causal_lm import _check_columns  # the same column checks as a causal-LM job's

    settings = body.causal_lm or (trained.causal_lm if trained else CausalLMSettings())
    text_column = body.text_column or (trained.text_column if trained else "text")
    # Only the columns are read from it: constructed, not validated (the rest of a job spec does not apply).
    probe = JobSpec.model_construct(task=CAUSAL_LM, text_column=text_column, causal_lm=settings)
    _check_columns(dataset, probe, "")
    return {
        "text_column": text_column,
        "causal_lm": settings.model_dump(mode="json"),
        "samples": body.samples,
        "max_new_tokens": body.max_new_tokens,
    }


# Losses whose beta is the KL weight of DPO's implicit reward; ORPO's and SimPO's beta mean something else.
KL_BETA_LOSSES = ("dpo", "ipo", "kto")


def _preference_settings(dataset: Dataset, body: EvaluationCreate, trained: JobSpec | None) -> dict[str, Any]:
    """The preference format and columns (as detected on upload unless given), every row checked as a
    preference job checks it, and the beta of the implicit rewards (the adapter's job's)."""
    from app.services.preference import _check_rows  # the same row checks as a preference job's

    trained_settings = trained.preference if trained is not None else PreferenceSettings()
    proposal = dataset.profile.get("proposal") or {}
    if body.preference is not None:
        settings = body.preference
    elif proposal.get("task") == PREFERENCE:
        detected = {k: v for k, v in (proposal.get(PREFERENCE) or {}).items() if k != "loss"}
        settings = PreferenceSettings.model_validate({**trained_settings.model_dump(), **detected})
    else:
        raise InvalidSpec(
            f"Dataset {dataset.id} is not preference data (its columns: "
            f"{', '.join(map(repr, dataset.columns))}). A preference adapter is evaluated on pairs (prompt, chosen "
            "and rejected answers) or KTO data (messages and a true/false label); or name the columns in "
            "'preference'.",
            field="dataset_id",
        )
    # Constructed, not validated: only the preference settings are read (the rest of a job spec does not apply).
    _check_rows(dataset, JobSpec.model_construct(task=PREFERENCE, preference=settings), "")
    loss = trained_settings.loss
    beta = trained_settings.resolved_beta() if loss in KL_BETA_LOSSES else DEFAULT_BETA["dpo"]
    return {
        PREFERENCE: settings.model_dump(mode="json"),
        "beta": beta,
        "reference_adapter_id": trained_settings.continue_from_adapter_id,
    }


def _queue_for(trained: JobSpec | None) -> str:
    """The queue of the adapter's training job (GPU jobs' adapters evaluate on a GPU worker), one process."""
    from app.core.queue import queue_for

    if trained is None:
        return queue_for(None)
    return queue_for(trained.resources.model_copy(update={"num_processes": 1}))


def create_evaluation(
    session: Session, adapter_id: int, body: EvaluationCreate, owner_id: int | None = None
) -> Evaluation:
    """Check the request and queue the evaluation (``owner_id``: the caller's scope, None for the admin).

    The adapter and the dataset must be the caller's (NotFound otherwise, as for a missing id); the
    evaluation belongs to the adapter's owner. If the queue cannot take it, nothing is kept.
    """
    from app.core.queue import get_celery

    adapter = get_adapter(session, adapter_id, owner_id)
    dataset = get_dataset(session, body.dataset_id, owner_id)
    trained = training_spec(session, adapter)
    if adapter.task == CLASSIFICATION:
        settings = _classification_settings(dataset, adapter, body, trained)
    elif adapter.task == CAUSAL_LM:
        settings = _causal_settings(dataset, body, trained)
    elif adapter.task == PREFERENCE:
        settings = _preference_settings(dataset, body, trained)
    else:
        raise InvalidSpec(f"Adapters of task {adapter.task!r} cannot be evaluated.", field="adapter")
    evaluation = Evaluation(
        owner_id=adapter.owner_id,
        adapter_id=adapter_id,
        dataset_id=body.dataset_id,
        task=adapter.task,
        settings=settings,
    )
    session.add(evaluation)
    session.commit()
    session.refresh(evaluation)
    assert evaluation.id is not None
    try:
        result = get_celery().send_task(EVALUATE_TASK, args=[evaluation.id], queue=_queue_for(trained))
    except Exception as exc:
        session.delete(evaluation)
        session.commit()
        raise ServiceUnavailable(
            f"The job queue is not reachable ({type(exc).__name__}: {exc}); nothing was queued, try again."
        ) from exc
    evaluation.task_id = str(result.id)
    session.add(evaluation)
    session.commit()
    session.refresh(evaluation)
    return evaluation


def list_evaluations(
    session: Session, adapter_id: int, owner_id: int | None = None, offset: int = 0, limit: int = 100
) -> tuple[list[Evaluation], int]:
    """An adapter's evaluations, newest first, and how many there are (NotFound for another's adapter)."""
    get_adapter(session, adapter_id, owner_id)
    where = [Evaluation.adapter_id == adapter_id]
    if owner_id is not None:
        where.append(Evaluation.owner_id == owner_id)
    count = session.exec(select(func.count()).select_from(Evaluation).where(*where)).one()
    rows = session.exec(
        select(Evaluation).where(*where).order_by(col(Evaluation.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), count


def get_evaluation(session: Session, evaluation_id: int, owner_id: int | None = None) -> Evaluation:
    """One evaluation, or NotFound (also when ``owner_id`` is given and it belongs to someone else)."""
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None or (owner_id is not None and evaluation.owner_id != owner_id):
        raise NotFound(f"Evaluation {evaluation_id} does not exist.")
    return evaluation


def predictions_key(evaluation_id: int) -> str:
    """Where an evaluation's predictions CSV is kept in the artifact store."""
    return f"evaluations/{evaluation_id}/{PREDICTIONS_FILE}"


def open_predictions(evaluation: Evaluation) -> Iterator[bytes]:
    """The predictions CSV in chunks, streamed from the artifact store (NotFound until it exists).

    Existence is checked here, before the response starts, so a missing file is a 404, not a broken response.
    """
    key = evaluation.predictions_key
    store = get_store()
    if not key or not store.exists(key):
        if evaluation.status == EvaluationStatus.failed:
            state = "failed before writing predictions"
        elif evaluation.status.is_terminal:
            state = "has no predictions file"
        else:
            state = "has no predictions yet"
        raise NotFound(f"Evaluation {evaluation.id} {state}.")

    def chunks() -> Iterator[bytes]:
        with store.open(key) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                yield chunk

    return chunks()
