"""Compare jobs: which settings differ, and a summary row per job (size, time, memory, best and final scores)."""

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, select

from app.core.errors import InvalidSpec
from app.core.models import Adapter, Job, JobStatus, utcnow
from app.core.tasks import CLASSIFICATION, find_task
from app.services import jobs as jobs_service
from app.services.series import series_stats

MAX_COMPARED_JOBS = 50
# The spec's ``name`` always differs between jobs and already heads each column, so the diff leaves it out.
IGNORED_FIELDS = frozenset({"name"})
MISSING = object()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested spec as dotted paths to leaf values (lists are leaves): {"training.learning_rate": 0.001}."""
    if isinstance(value, dict):  # an empty settings group has no fields to compare
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def resolved_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored spec with every default filled in, as the worker ran it.

    Jobs store the resolved spec, but older rows (and methods whose settings gained fields since) may omit a
    default; comparing those raw would list ``alpha 16.0 vs —`` as a difference although both jobs ran with 16.
    A spec that no longer validates (a method since removed) is compared as stored.
    """
    from pydantic import ValidationError

    from app.core.spec import JobSpec

    try:
        return JobSpec.model_validate(spec).model_dump(mode="json")
    except ValidationError:
        return spec


def display_value(value: Any) -> str:
    """A setting as a person reads it: text as is (no JSON escapes such as ``\\u0027``), lists joined, None as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(display_value(item) for item in value) or "(none)"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def config_diff(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only the fields whose resolved values are not the same in every spec: [{field, values: [per spec]}].

    Defaults are filled in first (``resolved_spec``), so an omitted default is not a difference. A field that
    a spec still lacks (a setting of another method) counts as different and shows as None.
    """
    flat = [flatten(resolved_spec(spec)) for spec in specs]
    fields = sorted({key for one in flat for key in one} - IGNORED_FIELDS)
    rows = []
    for name in fields:
        values = [one.get(name, MISSING) for one in flat]
        encoded = {
            json.dumps(v, sort_keys=True, default=str) if v is not MISSING else "<missing>" for v in values
        }
        if len(encoded) > 1:
            rows.append({"field": name, "values": [None if v is MISSING else v for v in values]})
    return rows


def parse_job_ids(raw: list[str] | str | None) -> list[int]:
    """Job ids from ``?jobs=1&jobs=2`` or ``?jobs=1,2``, in order, without repeats; a 422 names a bad one."""
    items = [raw] if isinstance(raw, str) else list(raw or [])
    ids: list[int] = []
    for item in items:
        for part in str(item).replace(" ", ",").split(","):
            if not part:
                continue
            if not part.isdigit() or int(part) < 1:
                raise InvalidSpec(f"jobs: {part!r} is not a job id; give ids like jobs=3,5,8", field="jobs")
            if int(part) not in ids:
                ids.append(int(part))
    if len(ids) > MAX_COMPARED_JOBS:
        raise InvalidSpec(
            f"jobs: compare at most {MAX_COMPARED_JOBS} jobs at once (got {len(ids)})", field="jobs"
        )
    return ids


def _wall_seconds(job: Job) -> float | None:
    if job.started_at is None:
        return None
    end = job.finished_at or (utcnow() if job.status == JobStatus.running else None)
    if end is None:
        return None
    start = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=UTC)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    return max(0.0, (end - start).total_seconds())


@dataclass
class SummaryRow:
    """One job in the comparison table."""

    job_id: int
    name: str
    status: str
    method: str
    task: str
    trainable_params: int | None
    total_params: int | None
    trainable_percent: float | None
    wall_seconds: float | None
    peak_rss_mb: float | None
    peak_cuda_mb: float | None
    metric: str
    best_metric: float | None
    final_metric: float | None
    best_eval_loss: float | None
    final_eval_loss: float | None
    sweep_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def summary_row(session: Session, job: Job) -> SummaryRow:
    """Method, parameters, wall time, peak memory, best and final eval scores of one job."""
    assert job.id is not None
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).first()
    stats = series_stats(session, job.id)
    task = str(job.spec.get("task", CLASSIFICATION))
    info = find_task(task)  # the task's eval metric decides which job is better; else the loss, lower better
    metric, higher_is_better = (info.primary_metric, info.higher_is_better) if info else ("loss", False)
    scores = stats.get(f"eval.{metric}")
    losses = stats.get("eval.loss")
    rss = stats.get("train.peak_rss_mb")
    cuda = stats.get("train.cuda_peak_mb")
    percent = None
    if adapter is not None and adapter.total_params:
        percent = 100.0 * adapter.trainable_params / adapter.total_params
    return SummaryRow(
        job_id=job.id,
        name=job.name,
        status=str(job.status),
        method=job.method,
        task=task,
        trainable_params=adapter.trainable_params if adapter else None,
        total_params=adapter.total_params if adapter else None,
        trainable_percent=percent,
        wall_seconds=_wall_seconds(job),
        peak_rss_mb=rss["max"] if rss else None,
        peak_cuda_mb=cuda["max"] if cuda else None,
        metric=metric,
        best_metric=(scores["max"] if higher_is_better else scores["min"]) if scores else None,
        final_metric=scores["last"] if scores else None,
        best_eval_loss=losses["min"] if losses else None,
        final_eval_loss=losses["last"] if losses else None,
        sweep_id=job.sweep_id,
    )


@dataclass
class Comparison:
    """Everything the compare view shows, except the curves (fetched per job from the series endpoint)."""

    jobs: list[Job]
    diff: list[dict[str, Any]]
    summary: list[SummaryRow]
    generated_at: datetime = field(default_factory=utcnow)

    @property
    def running(self) -> bool:
        """True while some compared job may still change."""
        return any(not job.status.is_terminal for job in self.jobs)


def compare_jobs(session: Session, job_ids: list[int], owner_id: int | None = None) -> Comparison:
    """Compare the given jobs (NotFound names a missing one, or one of another owner's when ``owner_id``)."""
    jobs = [jobs_service.get_job(session, job_id, owner_id) for job_id in job_ids]
    return Comparison(
        jobs=jobs,
        diff=config_diff([job.spec for job in jobs]),
        summary=[summary_row(session, job) for job in jobs],
    )


def headline_metric(task: str, metrics: dict[str, float]) -> tuple[str, float] | None:
    """The label and value a jobs list shows for a finished job: accuracy for classification, eval perplexity
    (or eval loss) for a causal LM; None when the job logged no evaluation."""
    info = find_task(task)  # (key in the adapter's final metrics, label) pairs, first found wins
    for key, label in info.headline_metrics if info else (("loss", "eval loss"),):
        value = metrics.get(key)
        if isinstance(value, int | float):
            return label, float(value)
    return None


def headline_metrics(session: Session, job_ids: list[int]) -> dict[int, tuple[str, float]]:
    """``headline_metric`` of each listed job that has an adapter, in one query (the adapter keeps the final
    evaluation, or the best one when the job kept its best checkpoint)."""
    if not job_ids:
        return {}
    adapters = session.exec(select(Adapter).where(Adapter.job_id.in_(job_ids))).all()  # type: ignore[attr-defined]
    out = {}
    for adapter in adapters:
        headline = headline_metric(adapter.task, adapter.metrics or {})
        if headline is not None:
            out[adapter.job_id] = headline
    return out


# Adapter metrics (the final evaluation, keys without ``eval_``) as people read them: label and how to show it.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "accuracy": ("Eval accuracy", "{:.3f}"),
    "f1_macro": ("Eval F1 (macro)", "{:.3f}"),
    "token_accuracy": ("Eval token accuracy", "{:.3f}"),
    "loss": ("Eval loss", "{:.4f}"),
    "perplexity": ("Eval perplexity", "{:.2f}"),
    "train_loss": ("Final train loss", "{:.4f}"),
    "runtime": ("Eval time", "{:.1f} s"),
    "samples_per_second": ("Eval speed", "{:.1f} samples/s"),
    "steps_per_second": ("Eval steps", "{:.2f} steps/s"),
    "epoch": ("Epochs trained", "{:.2f}"),
}


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """An adapter's metrics as (label, value with unit) rows, the known ones first (``runtime 5.068`` reads
    "Eval time 5.1 s"); a key not listed keeps its name, made readable."""
    known = [key for key in METRIC_LABELS if key in metrics]
    rest = sorted(key for key in metrics if key not in METRIC_LABELS)
    rows = []
    for key in known + rest:
        value = metrics[key]
        label, pattern = METRIC_LABELS.get(key, (key.replace("_", " ").capitalize(), "{:.4g}"))
        text = pattern.format(value) if isinstance(value, int | float) else str(value)
        rows.append((label, text))
    return rows
