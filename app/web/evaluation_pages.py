"""Evaluation pages: the form and list on an adapter's page (a fragment it loads), and one evaluation's page.

The adapter page loads ``/adapters/{id}/evaluations`` with htmx, so this feature needs no change to the
adapter page's handler; without JavaScript the fragment is also a page of its own.
"""

from typing import Any, get_args

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from app.core.errors import InvalidSpec
from app.core.spec import CausalLMSettings, DataFormat, JobSpec
from app.core.tasks import CLASSIFICATION, PREFERENCE
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.http.errors import validation_items
from app.services import adapters as adapters_service
from app.services import audit
from app.services import datasets as datasets_service
from app.services import evaluations as service
from app.services.evaluations import EvaluationCreate
from app.web.render import redirect, render

router = APIRouter(include_in_schema=False)

DATASET_CHOICES = 200
# The causal-LM column fields the form offers (each format reads some of them; see app/core/formats.py).
CAUSAL_COLUMN_FIELDS = (
    "instruction_column",
    "input_column",
    "output_column",
    "prompt_column",
    "completion_column",
    "messages_column",
)


def _form_context(session: SessionDep, owner_id: int | None, adapter_id: int) -> dict[str, Any]:
    adapter = adapters_service.get_adapter(session, adapter_id, owner_id)
    datasets, _ = datasets_service.list_datasets(session, 0, DATASET_CHOICES, owner_id)
    evaluations, count = service.list_evaluations(session, adapter_id, owner_id, 0, 50)
    trained = service.training_spec(session, adapter)
    return {
        "adapter": adapter,
        "datasets": datasets,
        "evaluations": [service.evaluation_public(row) for row in evaluations],
        "count": count,
        "default_text_column": ", ".join(trained.text_columns or [trained.text_column]) if trained else "",
        "default_label_column": trained.label_column if trained else "",
        "causal_lm": (trained.causal_lm if trained else CausalLMSettings()).model_dump(),
        "causal_formats": get_args(DataFormat),
        "causal_columns": CAUSAL_COLUMN_FIELDS,
    }


@router.get("/adapters/{adapter_id}/evaluations", response_class=HTMLResponse)
def evaluations_fragment(
    request: Request, session: SessionDep, owner_id: OwnerScope, adapter_id: int
) -> HTMLResponse:
    """The adapter's evaluations and the form that starts one."""
    return render(request, "_evaluations.html", _form_context(session, owner_id, adapter_id))


def _causal_lm_from_form(form: Any, trained: JobSpec | None) -> dict[str, Any]:
    """The format and columns chosen in the form over the adapter's training settings (template, system
    prompt and masking stay the training ones)."""
    settings = (trained.causal_lm if trained else CausalLMSettings()).model_dump()
    if form.get("causal_lm.format"):
        settings["format"] = str(form.get("causal_lm.format"))
    for name in CAUSAL_COLUMN_FIELDS:
        value = form.get(f"causal_lm.{name}")
        if isinstance(value, str):
            # An empty input column means the data has none; the other columns keep their training names.
            settings[name] = value.strip() or (None if name == "input_column" else settings[name])
    return settings


def _request_from_form(form: Any, task: str, trained: JobSpec | None = None) -> EvaluationCreate:
    """The form's fields as an API request: empty column fields take the adapter's training columns."""
    values: dict[str, Any] = {"dataset_id": form.get("dataset_id") or 0}
    if task == PREFERENCE:  # the format and columns detected on upload, as a preference job reads them
        return _validated(values)
    text_columns = [name.strip() for name in str(form.get("text_column") or "").split(",") if name.strip()]
    if task == CLASSIFICATION and len(text_columns) > 1:  # "title, description": joined as in training
        values["text_columns"] = text_columns
    elif text_columns:
        values["text_column"] = text_columns[0]
    if task == CLASSIFICATION:
        label_column = str(form.get("label_column") or "").strip()
        if form.get("predictions_only"):
            values["label_column"] = None
        elif label_column:
            values["label_column"] = label_column
    else:
        values["samples"] = form.get("samples") or 5
        values["causal_lm"] = _causal_lm_from_form(form, trained)
    return _validated(values)


def _validated(values: dict[str, Any]) -> EvaluationCreate:
    try:
        return EvaluationCreate.model_validate(values)
    except ValidationError as exc:
        first = validation_items(exc.errors(), default_field="form")[0]
        raise InvalidSpec(f"{first['field']}: {first['message']}", field=first["field"]) from None


@router.post("/adapters/{adapter_id}/evaluations")
async def start_evaluation(
    request: Request, session: SessionDep, user: CurrentUser, owner_id: OwnerScope, adapter_id: int
) -> Response:
    """The adapter page's form: queue an evaluation, then show it."""
    form = await request.form()
    adapter = adapters_service.get_adapter(session, adapter_id, owner_id)
    # A domain error: the error fragment for htmx, the error page for a plain form post (app/http/errors.py).
    body = _request_from_form(form, adapter.task, service.training_spec(session, adapter))
    evaluation = service.create_evaluation(session, adapter_id, body, owner_id)
    audit.record(session, user, "create", "evaluation", evaluation.id, f"adapter {adapter_id}")
    return redirect(request, f"/evaluations/{evaluation.id}")


@router.get("/evaluations/{evaluation_id}", response_class=HTMLResponse)
def evaluation_page(
    request: Request, session: SessionDep, owner_id: OwnerScope, evaluation_id: int
) -> HTMLResponse:
    """One evaluation: metrics, per-class table, confusion matrix or samples, and the predictions download."""
    evaluation = service.get_evaluation(session, evaluation_id, owner_id)
    return render(
        request,
        "evaluation.html",
        {"nav": "adapters", "evaluation": service.evaluation_public(evaluation)},
    )
