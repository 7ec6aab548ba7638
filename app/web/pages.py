"""HTML pages (Jinja2 + htmx). Handlers are thin: they call the same services as the JSON API.

Forms work without JavaScript (post, then a 303 redirect); htmx enhances them where a fragment is enough.
Errors from the services come back in the form they belong to, with the service's status code.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.core.base_models import catalog
from app.core.errors import InvalidDataset, StudioError
from app.core.method_registry import registry
from app.core.models import Dataset
from app.core.presets import PRESETS, PRESETS_BY_KEY, estimate_seconds, preset_values
from app.core.settings import BUNDLED_MODEL_ID
from app.core.tasks import PREFERENCE
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import adapters as adapters_service
from app.services import audit
from app.services import datasets as datasets_service
from app.services import jobs as jobs_service
from app.services.checkpoints import list_checkpoints
from app.services.compare import headline_metrics
from app.web import forms
from app.web.render import error_page, form_errors, redirect, render

router = APIRouter(include_in_schema=False)

RECENT_JOBS = 10
LIST_LIMIT = 200


# ---- dashboard --------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """Recent jobs, and a way in for a first visit (the demo dataset)."""
    jobs, job_count = jobs_service.list_jobs(session, 0, RECENT_JOBS, owner_id)
    datasets, dataset_count = datasets_service.list_datasets(session, 0, 5, owner_id)
    _, adapter_count = adapters_service.list_adapters(session, 0, 1, owner_id)
    return render(
        request,
        "dashboard.html",
        {
            "nav": "dashboard",
            "jobs": [jobs_service.job_public(session, job) for job in jobs],
            "job_metrics": headline_metrics(session, [job.id for job in jobs if job.id is not None]),
            "job_count": job_count,
            "datasets": datasets,
            "dataset_count": dataset_count,
            "adapter_count": adapter_count,
        },
    )


# ---- datasets ---------------------------------------------------------------------------------


def _datasets_context(
    session: Session, owner_id: int | None, error: StudioError | None = None
) -> dict[str, Any]:
    datasets, count = datasets_service.list_datasets(session, 0, LIST_LIMIT, owner_id)
    return {"nav": "datasets", "datasets": datasets, "count": count, "error": error}


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """Datasets and the upload form."""
    return render(request, "datasets.html", _datasets_context(session, owner_id))


@router.post("/datasets")
async def upload_dataset(
    request: Request, session: SessionDep, user: CurrentUser, owner_id: OwnerScope
) -> Response:
    """The upload form: validate and store through the service, then show the new dataset's profile."""
    form = await request.form()
    upload = form.get("file")
    name = form.get("name")
    try:
        with form_errors("datasets.html", lambda error: _datasets_context(session, owner_id, error)):
            if not isinstance(upload, UploadFile) or not upload.filename:
                raise InvalidDataset(
                    "Choose a file to upload (.csv, .tsv, .txt, .json, .jsonl, .parquet, .arrow or .zip).",
                    field="file",
                )
            dataset = await run_in_threadpool(
                datasets_service.create_dataset,
                session,
                upload.file,
                upload.filename,
                name.strip() if isinstance(name, str) and name.strip() else None,
                user.id,
                _import_options(form),
            )
            audit.record(session, user, "create", "dataset", dataset.id, dataset.filename)
    finally:
        await form.close()
    return redirect(request, f"/datasets/{dataset.id}")


@router.post("/datasets/demo")
def load_demo_dataset(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    """The dashboard's "Load demo dataset" button."""
    dataset, created = datasets_service.load_demo_dataset(session, user.id)
    if created:
        audit.record(session, user, "create", "dataset", dataset.id, "demo")
    return redirect(request, f"/datasets/{dataset.id}")


IMPORT_FIELDS = (
    "header",
    "column_names",
    "delimiter",
    "quotechar",
    "index_column",
    "encoding",
    "nested",
    "explode_column",
    "split",
)


def _import_options(form: Any) -> dict[str, str]:
    """The upload form's import options; empty ones (auto) are left to detection."""
    options = {key: form.get(key) for key in IMPORT_FIELDS}
    return {key: value for key, value in options.items() if isinstance(value, str) and value.strip()}


@router.post("/datasets/{dataset_id}/reimport")
async def reimport_dataset(
    request: Request, session: SessionDep, user: CurrentUser, owner_id: OwnerScope, dataset_id: int
) -> Response:
    """The dataset page's re-import form: parse the stored original again with the chosen options."""
    form = await request.form()
    await run_in_threadpool(
        datasets_service.reimport_dataset, session, dataset_id, _import_options(form), owner_id
    )
    audit.record(session, user, "reimport", "dataset", dataset_id)
    return redirect(request, f"/datasets/{dataset_id}")


def _label_columns(dataset: Dataset) -> list[tuple[str, dict[str, int]]]:
    columns = dataset.profile.get("columns", {})
    return [(name, info["value_counts"]) for name, info in columns.items() if info.get("value_counts")]


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
def dataset_page(
    request: Request, session: SessionDep, owner_id: OwnerScope, dataset_id: int
) -> HTMLResponse:
    """A dataset's profile: columns, label balance, text lengths, preview."""
    dataset = datasets_service.get_dataset(session, dataset_id, owner_id)
    return render(
        request,
        "dataset.html",
        {"nav": "datasets", "dataset": dataset, "label_columns": _label_columns(dataset)},
    )


@router.get("/datasets/{dataset_id}/lengths", response_class=HTMLResponse)
async def dataset_lengths(
    request: Request,
    session: SessionDep,
    owner_id: OwnerScope,
    dataset_id: int,
    base_model: str = BUNDLED_MODEL_ID,
) -> HTMLResponse:
    """Token lengths of the proposed text column(s) for a base model (the dataset page loads it by htmx)."""
    from app.core.token_lengths import columns_for, length_report

    dataset = datasets_service.get_dataset(session, dataset_id, owner_id)
    context: dict[str, Any] = {"report": None, "error": None}
    try:
        columns = columns_for(_proposed_values(dataset), dataset)
        context["report"] = await run_in_threadpool(length_report, dataset, base_model, columns, None)
    except StudioError as exc:
        context["error"] = exc.message
    except ValueError as exc:
        context["error"] = str(exc).splitlines()[0]
    return render(request, "_job_lengths.html", context)


@router.post("/datasets/{dataset_id}/delete")
def delete_dataset(
    request: Request, session: SessionDep, user: CurrentUser, owner_id: OwnerScope, dataset_id: int
) -> Response:
    """Delete a dataset (refused while a job needs it), then back to the list."""
    datasets_service.delete_dataset(session, dataset_id, owner_id)
    audit.record(session, user, "delete", "dataset", dataset_id)
    return redirect(request, "/datasets")


# ---- jobs -------------------------------------------------------------------------------------


# Spec fields that name a dataset column: the form offers the dataset's columns for them.
COLUMN_FIELDS = (
    "text_column",
    "label_column",
    "text_columns",
    "causal_lm.instruction_column",
    "causal_lm.input_column",
    "causal_lm.output_column",
    "causal_lm.prompt_column",
    "causal_lm.completion_column",
    "causal_lm.messages_column",
    "preference.prompt_column",
    "preference.chosen_column",
    "preference.rejected_column",
    "preference.messages_column",
    "preference.label_column",
)


def _proposed_values(dataset: Dataset) -> dict[str, Any]:
    """Job form values from the dataset's proposal (profile["proposal"]): task, format and columns."""
    proposal = dataset.profile.get("proposal") or {}
    values: dict[str, Any] = {}
    if proposal.get("task"):
        values["task"] = proposal["task"]
    for name in ("text_column", "label_column", "text_columns"):
        if proposal.get(name):
            values[name] = proposal[name]
    for section in ("causal_lm", PREFERENCE):
        if proposal.get(section):
            values[section] = {key: value for key, value in proposal[section].items()}
    return values


def _owned_dataset(session: Session, dataset_id: Any, owner_id: int | None) -> Dataset | None:
    try:
        dataset = session.get(Dataset, int(dataset_id))
    except (TypeError, ValueError):
        return None
    if dataset is None or (owner_id is not None and dataset.owner_id != owner_id):
        return None
    return dataset


def _column_choices(dataset: Dataset) -> list[forms.Choice]:
    columns: dict[str, Any] = dataset.profile.get("columns", {})
    choices = []
    for name in dataset.columns:
        info = columns.get(name, {})
        detail = f"{info.get('type', '?')}, {info.get('distinct', 0):,} distinct"
        choices.append(forms.Choice(name, f"{name} ({detail})"))
    return choices


def _job_form_context(
    session: Session,
    values: Mapping[str, Any],
    errors: Mapping[str, str] | None = None,
    owner_id: int | None = None,
) -> dict[str, Any]:
    datasets, _ = datasets_service.list_datasets(session, 0, 1000, owner_id)
    dataset_choices = [forms.Choice(str(d.id), f"#{d.id} {d.name} ({d.row_count:,} rows)") for d in datasets]
    choices = {
        "dataset_id": dataset_choices,
        "validation_dataset_id": dataset_choices,
        "method": [forms.Choice(info.name, f"{info.title} ({info.name})") for info in registry().values()],
    }
    dataset = _owned_dataset(session, values.get("dataset_id"), owner_id)
    if dataset is not None:
        columns = _column_choices(dataset)
        choices.update({name: columns for name in COLUMN_FIELDS})
    sections = forms.job_form(values, choices, errors)
    for section in sections:
        for form_field in section.fields:
            if dataset is not None and form_field.name == "text_columns":
                form_field.kind = "multiselect"
            if dataset is not None and form_field.name in COLUMN_FIELDS:
                # A value that is not a column (typed into the API, or an older dataset's) stays visible.
                known = {choice.value for choice in form_field.choices}
                typed = (
                    form_field.value.split(", ") if form_field.kind == "multiselect" else [form_field.value]
                )
                form_field.choices = form_field.choices + [
                    forms.Choice(value, f"{value} (not a column of this dataset)")
                    for value in typed
                    if value and value not in known
                ]
            if dataset is not None and form_field.name == "causal_lm.input_column":
                form_field.nullable = True
            if form_field.name == "dataset_id":
                # Choosing a dataset swaps in its columns and the proposed task and format (/jobs/new/columns).
                form_field.attrs = {"hx-get": "/jobs/new/columns", "hx-trigger": "change", "hx-swap": "none"}
            elif form_field.name == "method":
                form_field.attrs = {
                    "hx-get": "/jobs/new/method",
                    "hx-target": "#section-method",
                    "hx-swap": "outerHTML",
                    "hx-trigger": "change",
                }
            elif form_field.name == "base_model":
                form_field.suggestions = catalog()
    known = {form_field.name for section in sections for form_field in section.fields}
    basic_fields, advanced = forms.split_basic(sections)
    method_section = next(section for section in sections if section.key == "method")
    basic_names = {f.name for f in basic_fields} | {f.name for f in forms.basic_method_fields(method_section)}
    return {
        "nav": "new-job",
        "all_sections": sections,
        "sections": advanced,
        "basic_fields": basic_fields,
        "method_basic_fields": forms.basic_method_fields(method_section),
        # A problem in a folded setting unfolds the advanced part, so the message is next to its input.
        "open_advanced": any(
            name not in basic_names and not name.startswith("causal_lm.") for name in errors or {}
        ),
        "presets": PRESETS,
        "errors": dict(errors or {}),
        "unplaced_errors": {k: v for k, v in (errors or {}).items() if k not in known},
        "has_datasets": bool(datasets),
        "dataset": dataset,
    }


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job_page(
    request: Request,
    session: SessionDep,
    owner_id: OwnerScope,
    dataset_id: int | None = None,
    method: str | None = None,
    clone: int | None = None,
) -> HTMLResponse:
    """The job form, generated from JobSpec, TrainingSettings and the method's config model; ``clone=<job id>``
    fills it with that job's settings (the ones auto chose are auto again)."""
    values: dict[str, Any] = {}
    clone_of = None
    if clone is not None:
        clone_of = jobs_service.get_job(session, clone, owner_id)  # 404 for another user's job
        values = clone_values(clone_of.spec, clone_of.name)
    if method:
        values["method"] = method
    if dataset_id is not None:
        values["dataset_id"] = str(dataset_id)
        dataset = _owned_dataset(session, dataset_id, owner_id)
        if dataset is not None:
            values.update(_proposed_values(dataset))
    context = _job_form_context(session, values, owner_id=owner_id)
    return render(request, "job_new.html", {**context, "clone_of": clone_of})


def clone_values(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Form values from a stored job spec: its settings as the job ran, except that the training settings the
    auto rule chose (``training.auto_fields``) are auto again, so a clone on other data gets the rule's numbers
    for that data rather than numbers chosen for the original's."""
    values = json.loads(json.dumps(dict(spec)))  # a deep copy
    training = values.setdefault("training", {})
    for auto_name in training.pop("auto_fields", None) or []:
        training[auto_name] = "auto"
    values["name"] = f"{name.removesuffix(' (copy)')} (copy)"[:200]
    return values


@router.post("/jobs/new/lengths", response_class=HTMLResponse)
async def job_form_lengths(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """Token lengths for the form's dataset, columns and base model: the recommended max_length and the share
    of examples the chosen max_length would truncate (refreshed by htmx as the form changes)."""
    from app.core.token_lengths import columns_for, length_report

    data = forms.form_to_input(_form_lists(await request.form()))
    dataset = _owned_dataset(session, data.get("dataset_id"), owner_id)
    context: dict[str, Any] = {"report": None, "error": None}
    if dataset is not None:
        raw_length = str((data.get("training") or {}).get("max_length") or "")
        try:
            context["report"] = await run_in_threadpool(
                length_report,
                dataset,
                str(data.get("base_model") or BUNDLED_MODEL_ID),
                columns_for(data, dataset),
                int(raw_length) if raw_length.isdigit() else None,
            )
        except StudioError as exc:
            context["error"] = exc.message
        except ValueError as exc:  # e.g. causal-LM settings that do not validate yet
            context["error"] = str(exc).splitlines()[0]
    return render(request, "_job_lengths.html", context)


# Fields the column swap replaces: the task, the causal-LM format and every column field.
_SWAPPED_FIELDS = ("task", "causal_lm.format", "preference.format", "preference.loss", *COLUMN_FIELDS)


@router.get("/jobs/new/columns", response_class=HTMLResponse)
def job_form_columns(
    request: Request, session: SessionDep, owner_id: OwnerScope, dataset_id: str = ""
) -> HTMLResponse:
    """The column fields for the chosen dataset (its columns as options, its proposal chosen), swapped out of band."""
    values: dict[str, Any] = {"dataset_id": dataset_id}
    dataset = _owned_dataset(session, dataset_id, owner_id)
    if dataset is not None:
        values.update(_proposed_values(dataset))
    sections = _job_form_context(session, values, owner_id=owner_id)["all_sections"]
    fields = [f for section in sections for f in section.fields if f.name in _SWAPPED_FIELDS]
    return render(request, "_job_columns.html", {"fields": fields, "dataset": dataset})


@router.get("/jobs/new/method", response_class=HTMLResponse)
def method_fields(request: Request, method: str = "lora") -> HTMLResponse:
    """The fields of one method's config (swapped in by htmx when the method select changes)."""
    if method not in registry():
        return error_page(
            request, 404, f"Unknown method {method!r}; choose one of: {', '.join(sorted(registry()))}."
        )
    section = forms.method_section(method)
    _, (advanced,) = forms.split_basic([section])
    # The method's size knob lives in the basic part (#method-basic, swapped out of band), the rest here.
    return render(
        request,
        "_job_method.html",
        {"section": advanced, "method_basic_fields": forms.basic_method_fields(section)},
    )


@router.post("/jobs/new/preset", response_class=HTMLResponse)
async def job_form_preset(
    request: Request, session: SessionDep, owner_id: OwnerScope, preset: str = ""
) -> HTMLResponse:
    """Fill the form's epochs, learning rate and method size from a preset (app/core/presets.py), computed with the
    auto rule for the form's dataset, model and method; the changed fields are swapped out of band."""
    chosen = PRESETS_BY_KEY.get(preset)
    if chosen is None:
        return error_page(
            request, 404, f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS_BY_KEY)}."
        )
    data = forms.form_to_input(_form_lists(await request.form()))
    note, fields = "", []
    spec, errors = forms.validate_job_input(data)
    if spec is None:
        name, message = next(iter(errors.items()))
        note = "Choose a dataset first." if "dataset_id" in errors else f"Fix {name} first: {message}"
    elif _owned_dataset(session, spec.dataset_id, owner_id) is None:
        note = f"Dataset {spec.dataset_id} does not exist; choose another."
    else:
        values, note = await run_in_threadpool(preset_values, session, spec, chosen)
        for dotted, value in values.items():
            forms.set_path(data, dotted, value)
        sections = _job_form_context(session, data, owner_id=owner_id)["all_sections"]
        fields = [f for section in sections for f in section.fields if f.name in values]
    return render(request, "_job_preset.html", {"fields": fields, "note": note})


@router.post("/jobs/new/estimate", response_class=HTMLResponse)
async def job_form_estimate(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """Before launch: the form's job's parameters, training memory (POST /api/v1/jobs/estimate's numbers) and
    a rough time, measured from a finished job of the same model and method."""
    from worker.estimate import estimate_job, gpu_fit  # torch loads on first use, never at web start-up

    data = forms.form_to_input(_form_lists(await request.form()))
    spec, errors = forms.validate_job_input(data)
    context: dict[str, Any] = {"errors": errors, "estimate": None, "time": None}
    if spec is not None:
        try:
            jobs_service.validate_spec(session, spec, owner_id)
            profile = datasets_service.get_dataset(session, spec.dataset_id, owner_id).profile
            result = await run_in_threadpool(estimate_job, spec, profile)
        except StudioError as exc:
            context["errors"] = {exc.field or "form": exc.message}
        else:
            from app.core.queue import suggest_gpu_class

            context["estimate"] = result
            context["gpu_class"] = suggest_gpu_class(result.memory.total_bytes)
            context["gpu_fit"] = gpu_fit(result.memory.total_bytes)
            context["time"] = estimate_seconds(session, spec, result.total_steps)
    return render(request, "_job_estimate.html", context)


def _form_lists(form: Any) -> dict[str, list[str]]:
    return {key: [value for value in form.getlist(key) if isinstance(value, str)] for key in form.keys()}


@router.post("/jobs/new")
async def create_job(
    request: Request, session: SessionDep, user: CurrentUser, owner_id: OwnerScope
) -> Response:
    """Build a JobSpec from the form (the API's validation), queue it, and go to the job's page."""
    form = await request.form()
    data = forms.form_to_input(_form_lists(form))
    spec, errors = forms.validate_job_input(data)
    if spec is not None:
        with form_errors(
            "job_new.html",
            lambda error: _job_form_context(session, data, {error.field or "form": error.message}, owner_id),
        ):
            job = await run_in_threadpool(jobs_service.create_job, session, spec, user.id)
        audit.record(session, user, "create", "job", job.id)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)
    context = _job_form_context(session, data, errors, owner_id)
    return render(request, "job_new.html", context, status_code=422)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """All jobs, newest first."""
    jobs, count = jobs_service.list_jobs(session, 0, LIST_LIMIT, owner_id)
    return render(
        request,
        "jobs.html",
        {
            "nav": "jobs",
            "jobs": [jobs_service.job_public(session, job) for job in jobs],
            "job_metrics": headline_metrics(session, [job.id for job in jobs if job.id is not None]),
            "count": count,
        },
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, session: SessionDep, owner_id: OwnerScope, job_id: int) -> HTMLResponse:
    """A job's live dashboard: status, progress, curves (fed by the SSE stream), events, config."""
    job = jobs_service.job_public(session, jobs_service.get_job(session, job_id, owner_id))
    dataset = session.get(Dataset, job.dataset_id) if job.dataset_id is not None else None
    return render(
        request,
        "job.html",
        {
            "nav": "jobs",
            "job": job,
            "dataset": dataset,
            "events": jobs_service.list_events(session, job_id, owner_id),
            "method": registry().get(job.method),
            "checkpoints": list_checkpoints(session, job_id),
        },
    )


@router.get("/jobs/{job_id}/events", response_class=HTMLResponse)
def job_events(request: Request, session: SessionDep, owner_id: OwnerScope, job_id: int) -> HTMLResponse:
    """The event log fragment (refreshed by htmx when the job's status changes)."""
    return render(
        request, "_job_events.html", {"events": jobs_service.list_events(session, job_id, owner_id)}
    )


# ---- adapters ---------------------------------------------------------------------------------


@router.get("/adapters", response_class=HTMLResponse)
def adapters_page(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """Adapters of finished jobs with their size, parameters and metrics."""
    rows, count = adapters_service.list_adapters(session, 0, LIST_LIMIT, owner_id)
    return render(
        request,
        "adapters.html",
        {
            "nav": "adapters",
            "adapters": [adapters_service.adapter_public(row) for row in rows],
            "count": count,
        },
    )


@router.get("/adapters/{adapter_id}", response_class=HTMLResponse)
def adapter_page(
    request: Request, session: SessionDep, owner_id: OwnerScope, adapter_id: int
) -> HTMLResponse:
    """One adapter, with a try-out box."""
    adapter = adapters_service.adapter_public(adapters_service.get_adapter(session, adapter_id, owner_id))
    return render(request, "adapter.html", {"nav": "adapters", "adapter": adapter})


@router.post("/adapters/{adapter_id}/predict", response_class=HTMLResponse)
async def predict(
    request: Request, session: SessionDep, owner_id: OwnerScope, adapter_id: int
) -> HTMLResponse:
    """The try-out fragment: predicted label and a probability bar per class."""
    form = await request.form()
    text = form.get("text")
    text = text.strip() if isinstance(text, str) else ""
    adapter = adapters_service.get_adapter(session, adapter_id, owner_id)
    results: Sequence[dict[str, Any]] = await adapters_service.predict(adapter, [text] if text else [])
    result = results[0]
    probabilities = sorted(result["probabilities"].items(), key=lambda item: item[1], reverse=True)
    return render(
        request, "_prediction.html", {"text": text, "label": result["label"], "probabilities": probabilities}
    )
