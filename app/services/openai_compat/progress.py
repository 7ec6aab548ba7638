"""OpenAI fine-tuning job events and checkpoints: a job's messages, metrics and saved steps, newest first."""

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from app.core import models
from app.core.errors import NotFound
from app.core.models import Adapter, Job, JobEvent, MetricPoint
from app.services.openai_compat.common import JOB_PREFIX, unix
from app.services.openai_compat.fine_tuning import fine_tuned_model_name, get_job

_LEVELS = {"error": "error", "traceback": "error", "warning": "warn", "cancel": "warn"}


def _event_items(session: Session, job: Job) -> list[tuple[datetime, str, dict[str, Any]]]:
    items: list[tuple[datetime, str, dict[str, Any]]] = []
    for event in session.exec(select(JobEvent).where(JobEvent.job_id == job.id).order_by(col(JobEvent.id))):
        event_id = f"ftevent-e{event.id}"
        items.append(
            (
                event.created_at,
                event_id,
                {
                    "object": "fine_tuning.job.event",
                    "id": event_id,
                    "created_at": unix(event.created_at),
                    "level": _LEVELS.get(event.kind, "info"),
                    "message": event.message,
                    "data": {"kind": event.kind},
                    "type": "message",
                },
            )
        )
    points = session.exec(
        select(MetricPoint).where(MetricPoint.job_id == job.id).order_by(col(MetricPoint.id))
    )
    for point in points:
        event_id = f"ftevent-m{point.id}"
        loss = point.values.get("loss")
        is_eval = point.split == "eval"
        data: dict[str, Any] = {
            "step": point.step,
            "total_steps": job.total_steps,
            "epoch": point.epoch,
            "train_loss": None if is_eval else loss,
            "valid_loss": loss if is_eval else None,
            **{
                f"{'valid' if is_eval else 'train'}_{key}": value
                for key, value in point.values.items()
                if key != "loss"
            },
        }
        total = f"/{job.total_steps}" if job.total_steps else ""
        shown = f"{loss:.4f}" if isinstance(loss, int | float) else "n/a"
        message = f"Step {point.step}{total}: {'validation' if is_eval else 'training'} loss={shown}"
        items.append(
            (
                point.created_at,
                event_id,
                {
                    "object": "fine_tuning.job.event",
                    "id": event_id,
                    "created_at": unix(point.created_at),
                    "level": "info",
                    "message": message,
                    "data": data,
                    "type": "metrics",
                },
            )
        )
    return items


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise NotFound(f"No such item to page after: {after!r}.", field="after")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return page, start + limit < len(items)


def list_events(
    session: Session, job_id: str, after: str | None, limit: int, owner_id: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """A job's messages (status changes, errors) and metrics, newest first."""
    job = get_job(session, job_id, owner_id)
    items = _event_items(session, job)
    items.sort(key=lambda item: (item[0].replace(tzinfo=None), item[1]), reverse=True)
    return _page([item for _, _, item in items], after, limit)


def _checkpoint_metrics(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": step,
        "train_loss": metrics.get("train_loss", metrics.get("loss")),
        "valid_loss": metrics.get("eval_loss", metrics.get("valid_loss")),
        "train_mean_token_accuracy": metrics.get("token_accuracy"),
        "valid_mean_token_accuracy": metrics.get("eval_token_accuracy"),
        "full_valid_loss": None,
        "full_valid_mean_token_accuracy": None,
    }


def list_checkpoints(
    session: Session, job_id: str, after: str | None, limit: int, owner_id: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Saved checkpoints of a job (from the resilience table, where it exists) and the final adapter, newest first."""
    job = get_job(session, job_id, owner_id)
    ft_job_id = f"{JOB_PREFIX}{job.id}"
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).first()
    model_name = fine_tuned_model_name(session, job)
    items: list[dict[str, Any]] = []
    checkpoint_table = getattr(models, "Checkpoint", None)
    steps: set[int] = set()
    if checkpoint_table is not None:
        rows = session.exec(
            select(checkpoint_table)
            .where(checkpoint_table.job_id == job.id)
            .order_by(col(checkpoint_table.step))
        ).all()
        for row in rows:
            steps.add(int(row.step))
            items.append(
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"ftckpt-{row.id}",
                    "created_at": unix(row.created_at),
                    "fine_tuned_model_checkpoint": f"{model_name}:ckpt-step-{row.step}",
                    "fine_tuning_job_id": ft_job_id,
                    "metrics": _checkpoint_metrics(int(row.step), dict(row.metrics or {})),
                    "step_number": int(row.step),
                }
            )
    if adapter is not None and job.current_step not in steps:
        metrics = dict(adapter.metrics)
        items.append(
            {
                "object": "fine_tuning.job.checkpoint",
                "id": f"ftckpt-final-{job.id}",
                "created_at": unix(adapter.created_at),
                "fine_tuned_model_checkpoint": model_name,
                "fine_tuning_job_id": ft_job_id,
                "metrics": {
                    **_checkpoint_metrics(job.current_step, metrics),
                    "valid_loss": metrics.get("loss"),
                },
                "step_number": job.current_step,
            }
        )
    items.sort(key=lambda item: (item["step_number"], item["created_at"] or 0), reverse=True)
    return _page(items, after, limit)
