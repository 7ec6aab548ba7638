"""Sweeps: a base job spec plus lists of values for some of its fields, queued as the grid of their combinations.

The grid maps dotted spec fields to value lists: ``{"method": ["lora", "ia3"], "training.learning_rate":
[1e-3, 5e-4], "method_config.r": [4, 8]}``. Every combination becomes one job. A ``method_config.*`` value
applies only to the methods that have that setting (IA3 has no rank), and combinations that end up with the
same spec are queued once. Every spec is validated before the first job is queued, so a bad grid queues
nothing.
"""

import copy
import itertools
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session, col, func, select

from app.core.errors import InvalidSpec, NotFound, StudioError
from app.core.method_registry import registry
from app.core.models import Job, JobStatus, Sweep, utcnow
from app.core.spec import JobSpec
from app.services import jobs as jobs_service

MAX_SWEEP_JOBS = 64
MAX_VALUES_PER_FIELD = 32


def _nested_sections() -> dict[str, type[BaseModel]]:
    """JobSpec fields that are settings groups (training, causal_lm, tracking, ...)."""
    return {
        name: info.annotation
        for name, info in JobSpec.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
    }


class SweepCreate(BaseModel):
    """A sweep request: a base spec and, per dotted field, the values to try."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored

    name: str | None = Field(default=None, max_length=200, description="A name; empty picks one.")
    base: dict[str, Any] = Field(
        description="A job spec (as for POST /api/v1/jobs) that every job starts from."
    )
    grid: dict[str, list[Any]] = Field(
        description='Dotted spec field -> values to try, e.g. {"method": ["lora", "ia3"], '
        '"training.learning_rate": [0.001, 0.0005], "method_config.r": [4, 8]}.'
    )


def _check_field(path: str) -> None:
    """A grid key must name a spec field (``method``), a nested one (``training.batch_size``) or a method
    setting (``method_config.r``)."""
    head, _, rest = path.partition(".")
    if head == "method_config" and rest and "." not in rest:
        known = {name for info in registry().values() for name in info.config.model_fields}
        if rest not in known:
            raise InvalidSpec(
                f"grid: {path!r} is not a setting of any method; method settings are: {', '.join(sorted(known))}",
                field=f"grid.{path}",
            )
        return
    sections = _nested_sections()
    if head in sections and rest and "." not in rest:
        fields = sections[head].model_fields
        if rest not in fields:
            raise InvalidSpec(
                f"grid: {path!r} is not a field of {head}; its fields are: {', '.join(fields)}",
                field=f"grid.{path}",
            )
        return
    if not rest and head in JobSpec.model_fields and head not in (*sections, "method_config", "name"):
        return
    raise InvalidSpec(
        f"grid: {path!r} is not a spec field to sweep; use a field such as method, base_model, "
        "training.learning_rate, training.batch_size or method_config.r",
        field=f"grid.{path}",
    )


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand(request: SweepCreate) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The grid's combinations as (spec input, the values chosen), without repeats, not yet validated."""
    if not request.grid:
        raise InvalidSpec("grid: give at least one field with a list of values to try", field="grid")
    total = 1
    for path, values in request.grid.items():
        _check_field(path)
        if not values:
            raise InvalidSpec(f"grid: {path!r} has no values; give at least one", field=f"grid.{path}")
        if len(values) > MAX_VALUES_PER_FIELD:
            raise InvalidSpec(
                f"grid: {path!r} has {len(values)} values; at most {MAX_VALUES_PER_FIELD} per field",
                field=f"grid.{path}",
            )
        total *= len(values)
    if total > MAX_SWEEP_JOBS:
        sizes = " × ".join(str(len(v)) for v in request.grid.values())
        raise InvalidSpec(
            f"grid: {sizes} = {total} jobs; a sweep queues at most {MAX_SWEEP_JOBS}. Try fewer values.",
            field="grid",
        )
    methods = registry()
    paths = list(request.grid)
    seen: set[str] = set()
    combos: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for combination in itertools.product(*(request.grid[path] for path in paths)):
        spec = copy.deepcopy(request.base)
        chosen: dict[str, Any] = {}
        method = dict(zip(paths, combination, strict=True)).get("method", spec.get("method", "lora"))
        for path, value in zip(paths, combination, strict=True):
            head, _, rest = path.partition(".")
            if head == "method_config":
                info = methods.get(str(method))
                if info is None or rest not in info.config.model_fields:
                    continue  # this method has no such setting (e.g. a rank for IA3)
            if rest:
                section = spec.get(head)
                spec[head] = section = dict(section) if isinstance(section, dict) else {}
                section[rest] = value
            else:
                spec[head] = value
            chosen[path] = value
        key = json.dumps(spec, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        combos.append((spec, chosen))
    return combos


def _validate(
    session: Session, spec_input: dict[str, Any], chosen: dict[str, Any], owner_id: int | None
) -> JobSpec:
    where = ", ".join(f"{k}={_label(v)}" for k, v in chosen.items()) or "the base spec"
    try:
        spec = JobSpec.model_validate(spec_input)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidSpec(f"The job for {where} is not valid: {field}: {message}", field=field) from None
    try:
        jobs_service.validate_spec(session, spec, owner_id)
    except StudioError as exc:
        raise InvalidSpec(f"The job for {where} is not valid: {exc.message}", field=exc.field) from None
    return spec


def create_sweep(session: Session, request: SweepCreate, owner_id: int | None = None) -> Sweep:
    """Validate every job of the grid, then queue them all under one sweep owned by ``owner_id``."""
    combos = expand(request)
    specs = [(_validate(session, spec, chosen, owner_id), chosen) for spec, chosen in combos]
    sweep = Sweep(
        owner_id=owner_id,
        name=request.name or f"sweep of {len(specs)} jobs",
        base_spec=request.base,
        grid=request.grid,
    )
    session.add(sweep)
    session.commit()
    session.refresh(sweep)
    queued: list[Job] = []
    try:
        for spec, chosen in specs:
            label = " ".join(f"{path.rsplit('.', 1)[-1]}={_label(value)}" for path, value in chosen.items())
            named = spec.model_copy(update={"name": f"{sweep.name} · {label}"[:200]})
            job = jobs_service.create_job(session, named, owner_id)
            job.sweep_id = sweep.id
            session.add(job)
            session.commit()
            queued.append(job)
    except StudioError:
        # The queue failed part-way: cancel what was queued so the sweep is all or nothing from here on.
        for job in queued:
            job.cancel_requested = True
            if job.status == JobStatus.queued:
                job.status = JobStatus.cancelled
                job.finished_at = utcnow()
            session.add(job)
        if not queued:
            session.delete(sweep)
        session.commit()
        raise
    return sweep


def get_sweep(session: Session, sweep_id: int, owner_id: int | None = None) -> Sweep:
    """One sweep, or NotFound."""
    sweep = session.get(Sweep, sweep_id)
    if sweep is None or (owner_id is not None and sweep.owner_id != owner_id):
        raise NotFound(f"Sweep {sweep_id} does not exist.")
    return sweep


def list_sweeps(
    session: Session, offset: int = 0, limit: int = 100, owner_id: int | None = None
) -> tuple[list[Sweep], int]:
    """Sweeps, newest first, and how many there are."""
    query = select(Sweep)
    counter = select(func.count()).select_from(Sweep)
    if owner_id is not None:
        query = query.where(Sweep.owner_id == owner_id)
        counter = counter.where(Sweep.owner_id == owner_id)
    rows = session.exec(query.order_by(col(Sweep.id).desc()).offset(offset).limit(limit)).all()
    return list(rows), session.exec(counter).one()


def sweep_jobs(session: Session, sweep_id: int) -> list[Job]:
    """The sweep's jobs in the order they were queued."""
    return list(session.exec(select(Job).where(Job.sweep_id == sweep_id).order_by(col(Job.id))).all())
