"""Checkpoints of a job: recorded by the worker, rotated, listed, downloaded as an adapter archive.

A checkpoint folder in the artifact store (``jobs/<id>/checkpoints/step-<n>``) holds what
``transformers.Trainer`` needs to resume (weights, optimizer, scheduler, RNG states, trainer state) and an
``adapter/`` subfolder saved the way the finished job's adapter is, so any checkpoint can be downloaded and used.
"""

import shutil
import tempfile
from pathlib import Path

from sqlmodel import Session, col, select

from app.core.errors import NotFound
from app.core.files import zip_folder
from app.core.models import Checkpoint
from app.core.storage import get_store

ADAPTER_FOLDER = "adapter"


def checkpoint_key(job_id: int, step: int) -> str:
    """The artifact-store folder of a job's checkpoint at a step."""
    return get_store().job_key(job_id, "checkpoints", f"step-{step}")


def list_checkpoints(session: Session, job_id: int) -> list[Checkpoint]:
    """A job's kept checkpoints, oldest step first."""
    statement = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(col(Checkpoint.step))
    return list(session.exec(statement).all())


def latest_checkpoint(session: Session, job_id: int) -> Checkpoint | None:
    """The checkpoint with the highest step, if the job has any."""
    statement = (
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(col(Checkpoint.step).desc()).limit(1)
    )
    return session.exec(statement).first()


def get_checkpoint(session: Session, job_id: int, step: int) -> Checkpoint:
    """The job's checkpoint at ``step``, or NotFound naming the steps that exist."""
    checkpoint = session.exec(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
    ).first()
    if checkpoint is None:
        steps = [c.step for c in list_checkpoints(session, job_id)]
        kept = f"its checkpoints are at steps {', '.join(map(str, steps))}" if steps else "it has none"
        raise NotFound(f"Job {job_id} has no checkpoint at step {step}; {kept}.")
    return checkpoint


def record_checkpoint(
    session: Session,
    job_id: int,
    step: int,
    epoch: float | None,
    storage_key: str,
    metrics: dict[str, float],
    keep: int,
) -> Checkpoint:
    """Add (or replace) the row of a checkpoint already stored, then keep only the newest ``keep``."""
    existing = session.exec(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
    ).first()
    if existing is not None:
        session.delete(existing)
        session.flush()
    checkpoint = Checkpoint(job_id=job_id, step=step, epoch=epoch, storage_key=storage_key, metrics=metrics)
    session.add(checkpoint)
    session.flush()
    rotate(session, job_id, keep)
    session.commit()
    session.refresh(checkpoint)
    return checkpoint


def rotate(session: Session, job_id: int, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (rows and folders); the caller commits."""
    store = get_store()
    for old in list_checkpoints(session, job_id)[: -max(keep, 1)]:
        store.delete(old.storage_key)
        session.delete(old)


def delete_after(session: Session, job_id: int, step: int) -> None:
    """Forget checkpoints beyond a step (a resumed run writes them again); the caller commits."""
    store = get_store()
    for checkpoint in list_checkpoints(session, job_id):
        if checkpoint.step > step:
            store.delete(checkpoint.storage_key)
            session.delete(checkpoint)


def delete_all(session: Session, job_id: int) -> None:
    """Delete every checkpoint of a job (rows and folders); the caller commits."""
    delete_after(session, job_id, -1)


def build_archive(checkpoint: Checkpoint) -> Path:
    """A zip of the checkpoint's adapter folder in a temporary file (the caller deletes it)."""
    store = get_store()
    if not store.exists(f"{checkpoint.storage_key}/{ADAPTER_FOLDER}"):
        raise NotFound(
            f"The files of checkpoint step {checkpoint.step} of job {checkpoint.job_id} are missing from the "
            "artifact store."
        )
    work = Path(tempfile.mkdtemp(prefix="checkpoint-"))
    folder = store.get_dir(f"{checkpoint.storage_key}/{ADAPTER_FOLDER}", work / ADAPTER_FOLDER)
    try:
        return zip_folder(folder, prefix=f"job-{checkpoint.job_id}-step-{checkpoint.step}-")
    finally:
        shutil.rmtree(work, ignore_errors=True)
