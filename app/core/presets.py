"""Job-form presets (quick try, balanced, best quality) and a rough training-time estimate.

A preset fills the form with numbers from the same rule that resolves ``auto`` (app/core/autoconfig.py), so what it
writes is what auto would choose, scaled: *balanced* is the rule itself; *quick try* runs a third of its
epochs (a look at whether the data and settings train at all, in a third of the time); *best quality* runs
twice its epochs with a larger LoRA rank and early stopping after three evaluations without a better best
metric (the best checkpoint is kept in any case, so the extra epochs cannot leave a worse adapter than fewer).
The learning rate is the rule's for all three. Documented in docs/defaults.md ("Presets").
"""

import math
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from app.core.autoconfig import MAX_EPOCHS, resolve_training, rule_inputs
from app.core.models import Job, JobStatus
from app.core.spec import AUTO, JobSpec


@dataclass(frozen=True)
class Preset:
    """One preset: its key, button title, one-line summary and how it scales the rule's epochs."""

    key: str
    title: str
    summary: str
    epoch_factor: float
    rank: int
    early_stopping_patience: int | None = None


PRESETS = (
    Preset("quick", "Quick try", "A third of auto's epochs: see quickly whether it learns at all.", 1 / 3, 8),
    Preset("balanced", "Balanced", "The auto rule's epochs and learning rate.", 1.0, 8),
    Preset(
        "best",
        "Best quality",
        "Twice auto's epochs, rank 16, early stopping after 3 evaluations without improvement.",
        2.0,
        16,
        early_stopping_patience=3,
    ),
)
PRESETS_BY_KEY = {preset.key: preset for preset in PRESETS}
# Method settings that a preset sets to its rank (LoRA, LoRA+, QLoRA: r; AdaLoRA: its initial rank).
RANK_FIELDS = ("r", "init_r")


def preset_values(session: Session, spec: JobSpec, preset: Preset) -> tuple[dict[str, Any], str]:
    """The form values (dotted names) a preset sets for this spec's dataset, model and method, and a note
    saying what the rule chose and why."""
    training = spec.training.model_copy(update={"num_epochs": AUTO, "learning_rate": AUTO, "max_steps": None})
    resolution = resolve_training(training, rule_inputs(session, spec))
    auto_epochs = float(resolution.training.num_epochs or 1)
    epochs = max(1, math.ceil(auto_epochs * preset.epoch_factor))
    epochs = min(epochs, 2 * MAX_EPOCHS)
    values: dict[str, Any] = {
        "training.num_epochs": epochs,
        "training.learning_rate": resolution.training.learning_rate,
        "training.max_steps": None,
        "training.early_stopping_patience": preset.early_stopping_patience,
    }
    settings = spec.method_settings()
    for name in RANK_FIELDS:
        if name in type(settings).model_fields:
            values[f"method_config.{name}"] = preset.rank
    note = (
        f"{preset.title}: {epochs:g} epoch(s) (auto would run {auto_epochs:g}), learning rate "
        f"{resolution.training.learning_rate:g}"
        + (f", rank {preset.rank}" if any(k.startswith("method_config.") for k in values) else "")
        + (
            f", early stopping after {preset.early_stopping_patience} evaluations without improvement"
            if preset.early_stopping_patience
            else ""
        )
        + f". Rule: {resolution.explanation}."
    )
    return values, note


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds a job should take, measured from a finished job of the same model, method and task."""

    seconds: float
    reference_job_id: int
    reference_seconds_per_step: float


def estimate_seconds(session: Session, spec: JobSpec, total_steps: int | None) -> TimeEstimate | None:
    """Roughly how long ``total_steps`` of this spec take, from the newest succeeded job with the same base
    model, method and task: its wall time per step (loading and evaluations included), scaled by examples x
    tokens per step. None when no such job finished yet (the studio never guesses a machine's speed)."""
    if not total_steps:
        return None
    rows = session.exec(
        select(Job)
        .where(
            col(Job.status) == JobStatus.succeeded,
            Job.base_model == spec.base_model,
            Job.method == spec.method,
        )
        .order_by(col(Job.id).desc())
        .limit(20)
    ).all()
    for job in rows:
        if (
            job.spec.get("task") != spec.task
            or not job.total_steps
            or not job.started_at
            or not job.finished_at
        ):
            continue
        training = job.spec.get("training") or {}
        ref_work = int(training.get("batch_size") or 1) * int(training.get("max_length") or 1)
        work = spec.training.batch_size * spec.training.max_length
        per_step = (job.finished_at - job.started_at).total_seconds() / job.total_steps
        if per_step <= 0:
            continue
        return TimeEstimate(per_step * work / max(1, ref_work) * total_steps, int(job.id or 0), per_step)
    return None
