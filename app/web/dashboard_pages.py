"""Pages for comparing jobs and running sweeps, and the job page's evaluation fragment (confusion matrix).

The curves are drawn in the browser from ``/api/v1/jobs/{id}/series`` (static/app.js); these handlers render the
tables around them: the summary, the config diff, the sweep form.
"""

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from app.core.errors import InvalidSpec, StudioError
from app.core.method_registry import registry
from app.core.tasks import CLASSIFICATION
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import compare as compare_service
from app.services import datasets as datasets_service
from app.services import jobs as jobs_service
from app.services import sweeps as sweeps_service
from app.services.sweeps import SweepCreate
from app.web.render import form_errors, render

router = APIRouter(include_in_schema=False)

PICKER_JOBS = 50


def _compare_context(session: Session, job_ids: list[int], owner_id: int | None) -> dict[str, Any]:
    comparison = compare_service.compare_jobs(session, job_ids, owner_id)
    return {
        "comparison": comparison,
        "job_ids": ",".join(str(i) for i in job_ids),
        "summary_url": f"/compare/summary?jobs={','.join(str(i) for i in job_ids)}",
    }


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """Pick jobs, then see their curves overlaid per metric, the settings that differ and a summary table."""
    job_ids = compare_service.parse_job_ids(request.query_params.getlist("jobs"))
    context = _compare_context(session, job_ids, owner_id) if job_ids else {}
    recent, _ = jobs_service.list_jobs(session, 0, PICKER_JOBS, owner_id)
    return render(
        request,
        "compare.html",
        {"nav": "compare", "recent": recent, "selected": set(job_ids), **context},
    )


@router.get("/compare/summary", response_class=HTMLResponse)
def compare_summary(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """The summary table fragment (htmx refreshes it while a compared job runs)."""
    job_ids = compare_service.parse_job_ids(request.query_params.getlist("jobs"))
    return render(request, "_compare_summary.html", _compare_context(session, job_ids, owner_id))


@router.get("/jobs/{job_id}/evaluation", response_class=HTMLResponse)
def job_evaluation(request: Request, session: SessionDep, owner_id: OwnerScope, job_id: int) -> HTMLResponse:
    """The job's structured evaluation (the classification confusion matrix of the latest evaluation)."""
    job = jobs_service.get_job(session, job_id, owner_id)
    return render(request, "_job_evaluation.html", {"job": job, "evaluation": job.evaluation or {}})


# ---- sweeps -----------------------------------------------------------------------------------


@router.get("/sweeps", response_class=HTMLResponse)
def sweeps_page(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """All sweeps, newest first."""
    sweeps, count = sweeps_service.list_sweeps(session, 0, 200, owner_id)
    rows = [(sweep, sweeps_service.sweep_jobs(session, sweep.id or 0)) for sweep in sweeps]
    return render(request, "sweeps.html", {"nav": "sweeps", "rows": rows, "count": count})


def _numbers(raw: str, field: str, kind: type) -> list[Any]:
    """ "1e-3, 5e-4" -> [0.001, 0.0005]; a bad item is a 422 naming the field."""
    values = []
    for part in raw.replace(";", ",").replace(" ", ",").split(","):
        if not part.strip():
            continue
        try:
            values.append(kind(part.strip()))
        except ValueError:
            raise InvalidSpec(
                f"{field}: {part.strip()!r} is not {'an integer' if kind is int else 'a number'}; "
                "separate values with commas",
                field=field,
            ) from None
    return values


def _sweep_form_context(
    session: Session, values: dict[str, Any], owner_id: int | None, error: StudioError | None = None
) -> dict[str, Any]:
    datasets, _ = datasets_service.list_datasets(session, 0, 1000, owner_id)
    return {
        "nav": "sweeps",
        "datasets": datasets,
        "methods": list(registry().values()),
        "values": values,
        "error": error,
    }


SWEEP_FORM_DEFAULTS = {
    "name": "",
    "dataset_id": "",
    "task": CLASSIFICATION,
    "base_model": "",
    "text_column": "text",
    "label_column": "label",
    "methods": ["lora"],
    "learning_rates": "0.001, 0.0005",
    "ranks": "8",
    "batch_sizes": "",
    "betas": "",
    "losses": "",
    "num_epochs": "1",
    "max_steps": "",
    "max_length": "128",
    "logging_steps": "10",
    "eval_steps": "",
    "extra": "",
}


@router.get("/sweeps/new", response_class=HTMLResponse)
def new_sweep_page(
    request: Request, session: SessionDep, owner_id: OwnerScope, dataset_id: int | None = None
) -> HTMLResponse:
    """The sweep form: a base job and lists of methods, learning rates, ranks, batch sizes (and, for preference
    tuning, betas and losses) to try."""
    values = dict(SWEEP_FORM_DEFAULTS, dataset_id=str(dataset_id or ""))
    return render(request, "sweep_new.html", _sweep_form_context(session, values, owner_id))


def _form_to_request(form: dict[str, Any]) -> SweepCreate:
    """The sweep form as an API request (the same validation as POST /api/v1/sweeps)."""
    if not str(form.get("dataset_id") or "").isdigit():
        raise InvalidSpec("dataset_id: choose the dataset to train on", field="dataset_id")
    base: dict[str, Any] = {
        "dataset_id": int(form["dataset_id"]),
        "task": form.get("task") or CLASSIFICATION,
        "text_column": form.get("text_column") or "text",
        "label_column": form.get("label_column") or "label",
        "training": {},
    }
    if form.get("base_model"):
        base["base_model"] = form["base_model"]
    for name, kind in (
        ("num_epochs", float),
        ("max_steps", int),
        ("max_length", int),
        ("logging_steps", int),
        ("eval_steps", int),
    ):
        numbers = _numbers(str(form.get(name) or ""), f"training.{name}", kind)
        if numbers:
            base["training"][name] = numbers[0]
    extra = str(form.get("extra") or "").strip()
    if extra:
        try:
            overrides = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise InvalidSpec(
                f"extra: not valid JSON ({exc.msg} at character {exc.pos})", field="extra"
            ) from None
        if not isinstance(overrides, dict):
            raise InvalidSpec("extra: give a JSON object of spec fields", field="extra")
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key].update(value)
            else:
                base[key] = value
    grid: dict[str, list[Any]] = {}
    methods = [str(m) for m in form.get("methods") or []]
    if methods:
        grid["method"] = methods
    for name, path, kind in (
        ("learning_rates", "training.learning_rate", float),
        ("ranks", "method_config.r", int),
        ("batch_sizes", "training.batch_size", int),
    ):
        numbers = _numbers(str(form.get(name) or ""), name, kind)
        if numbers:
            grid[path] = numbers
    betas = _numbers(str(form.get("betas") or ""), "betas", float)
    if betas:
        grid["preference.beta"] = betas
    losses = [name.strip() for name in str(form.get("losses") or "").split(",") if name.strip()]
    if losses:  # checked against the loss names with every job's spec
        grid["preference.loss"] = losses
    return SweepCreate(name=form.get("name") or None, base=base, grid=grid)


@router.post("/sweeps/new")
async def create_sweep(
    request: Request, session: SessionDep, user: CurrentUser, owner_id: OwnerScope
) -> Response:
    """Queue the sweep from the form, then show its live comparison."""
    raw = await request.form()
    form: dict[str, Any] = {key: raw.get(key) for key in SWEEP_FORM_DEFAULTS if key != "methods"}
    form["methods"] = raw.getlist("methods")
    with form_errors("sweep_new.html", lambda error: _sweep_form_context(session, form, owner_id, error)):
        sweep_request = _form_to_request(form)
        sweep = await run_in_threadpool(sweeps_service.create_sweep, session, sweep_request, user.id)
    return RedirectResponse(f"/sweeps/{sweep.id}", status_code=303)


@router.get("/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(request: Request, session: SessionDep, owner_id: OwnerScope, sweep_id: int) -> HTMLResponse:
    """A sweep: the comparison of its jobs, filling in live as they train."""
    sweep = sweeps_service.get_sweep(session, sweep_id, owner_id)
    job_ids = [job.id for job in sweeps_service.sweep_jobs(session, sweep_id) if job.id is not None]
    context = _compare_context(session, job_ids, owner_id) if job_ids else {}
    return render(request, "sweep.html", {"nav": "sweeps", "sweep": sweep, **context})
