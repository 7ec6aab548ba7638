"""Datasets: receive an upload, validate and profile it, store it, re-import it with other options, list, delete."""

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from sqlmodel import Session, col, func, select

from app.core.datasets_io import ImportResult, detect_format, profile_rows, propose, read_dataset
from app.core.errors import Conflict, InvalidDataset, InvalidSpec, NotFound
from app.core.files import receive_upload
from app.core.models import Dataset, Job, JobStatus
from app.core.settings import get_settings
from app.core.storage import get_store
from app.services.quota import check_quota

_UNSAFE_NAME = re.compile(r"[/\\]|^\.\.?$|\x00")


def _check_filename(filename: str | None) -> str:
    if not filename or not filename.strip():
        raise InvalidDataset(
            "The upload has no file name; choose a .csv, .tsv, .txt, .json, .jsonl, .parquet, .arrow or .zip file.",
            field="file",
        )
    if _UNSAFE_NAME.search(filename) or ".." in Path(filename).parts:
        raise InvalidDataset(
            f"The file name {filename!r} contains a path; send only the file's own name.", field="file"
        )
    if len(filename) > 255:
        raise InvalidDataset("The file name is longer than 255 characters.", field="file")
    return filename


def create_dataset(
    session: Session,
    stream: BinaryIO,
    filename: str | None,
    name: str | None = None,
    owner_id: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> Dataset:
    """Validate, profile and store an uploaded file; on any problem nothing is kept.

    ``options`` are the import options (app.core.datasets_io.ImportOptions: encoding, delimiter, quotechar, header,
    column_names, index_column, nested, explode_column, split); what is not given is detected, and what was
    used is stored in ``profile["import"]`` so the worker reads the file the same way.
    """
    settings = get_settings()
    store = get_store()
    filename = _check_filename(filename)
    fmt = detect_format(filename)
    temp = store.temp_path()
    try:
        size = receive_upload(stream, temp, settings.max_upload_bytes)
        check_quota(session, owner_id, size, "The dataset")
        data = temp.read_bytes()
        result = _import(data, fmt, options)
        digest = hashlib.sha256(data).hexdigest()
        existing = session.exec(
            select(Dataset).where(Dataset.sha256 == digest, Dataset.owner_id == owner_id)
        ).first()
        if existing is not None:
            raise Conflict(
                f"This file was already uploaded as dataset {existing.id} ({existing.name!r}); use that one.",
                field="file",
            )
        key = store.new_dataset_key(fmt)
        dataset = Dataset(
            name=((name or "").strip() or filename)[:200],
            filename=filename,
            format=fmt,
            storage_key=key,
            size_bytes=size,
            sha256=digest,
            owner_id=owner_id,
            row_count=len(result.rows),
            columns=result.columns,
            profile=_profile(result),
        )
        store.put_file(temp, key)
        try:
            session.add(dataset)
            session.commit()
        except BaseException:
            session.rollback()
            store.delete(key)
            raise
        session.refresh(dataset)
        return dataset
    finally:
        temp.unlink(missing_ok=True)


def _import(data: bytes, fmt: str, options: Mapping[str, Any] | None) -> ImportResult:
    """Parse a file with the import options (detecting the rest), within the row limit."""
    settings = get_settings()
    # A zipped datasets folder unpacks in memory; Arrow compresses text a few times at most.
    result = read_dataset(data, fmt, options, max_unpacked_bytes=8 * settings.max_upload_bytes)
    if len(result.rows) > settings.max_rows:
        raise InvalidDataset(
            f"The file has {len(result.rows):,} rows; the limit is {settings.max_rows:,} (PEFT_STUDIO_MAX_ROWS).",
            field="file",
        )
    return result


def _profile(result: ImportResult) -> dict[str, Any]:
    """The stored profile: column statistics, how the file was read, and the proposed task and columns."""
    profile = profile_rows(result.columns, result.rows)
    profile["import"] = {**result.options, "notes": result.notes}
    profile["proposal"] = propose(result.columns, profile)
    return profile


def _active_job_using(session: Session, dataset_id: int) -> Job | None:
    active_jobs = session.exec(
        select(Job).where(col(Job.status).in_([JobStatus.queued, JobStatus.running])).order_by(col(Job.id))
    ).all()
    return next(
        (
            job
            for job in active_jobs
            if job.dataset_id == dataset_id or job.spec.get("validation_dataset_id") == dataset_id
        ),
        None,
    )


def reimport_dataset(
    session: Session, dataset_id: int, options: Mapping[str, Any] | None, owner_id: int | None = None
) -> Dataset:
    """Read the stored original file again with other import options; the file itself is kept as uploaded.

    Refused while a queued or running job reads the dataset (its rows would change under it).
    """
    dataset = get_dataset(session, dataset_id, owner_id)
    active = _active_job_using(session, dataset_id)
    if active is not None:
        raise Conflict(
            f"Dataset {dataset_id} is used by job {active.id}, which is {active.status}; wait for it to finish "
            "or cancel it, then re-import."
        )
    data = get_store().local_file(dataset.storage_key).read_bytes()
    result = _import(data, dataset.format, options)
    dataset.columns = result.columns
    dataset.row_count = len(result.rows)
    dataset.profile = _profile(result)
    session.add(dataset)
    session.commit()
    session.refresh(dataset)
    return dataset


def list_datasets(
    session: Session, offset: int = 0, limit: int = 100, owner_id: int | None = None
) -> tuple[list[Dataset], int]:
    """Datasets, newest first, and how many there are (only ``owner_id``'s when given)."""
    where = [Dataset.owner_id == owner_id] if owner_id is not None else []
    count = session.exec(select(func.count()).select_from(Dataset).where(*where)).one()
    rows = session.exec(
        select(Dataset).where(*where).order_by(col(Dataset.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), count


def get_dataset(session: Session, dataset_id: int, owner_id: int | None = None) -> Dataset:
    """One dataset, or NotFound (also when ``owner_id`` is given and it belongs to someone else)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or (owner_id is not None and dataset.owner_id != owner_id):
        raise NotFound(f"Dataset {dataset_id} does not exist.")
    return dataset


def delete_dataset(session: Session, dataset_id: int, owner_id: int | None = None) -> None:
    """Delete a dataset and its file; refused while a queued or running job still needs it."""
    dataset = get_dataset(session, dataset_id, owner_id)
    active_jobs = session.exec(
        select(Job).where(col(Job.status).in_([JobStatus.queued, JobStatus.running])).order_by(col(Job.id))
    ).all()
    # A job needs the dataset it trains on and the one it evaluates on (kept only in its spec).
    active = next(
        (
            job
            for job in active_jobs
            if job.dataset_id == dataset_id or job.spec.get("validation_dataset_id") == dataset_id
        ),
        None,
    )
    if active is not None:
        raise Conflict(
            f"Dataset {dataset_id} is used by job {active.id}, which is {active.status}; "
            "wait for it to finish or cancel it, then delete the dataset."
        )
    for job in session.exec(select(Job).where(Job.dataset_id == dataset_id)).all():
        job.dataset_id = None
        session.add(job)
    key = dataset.storage_key
    session.delete(dataset)
    session.commit()
    get_store().delete(key)


DEMO_DATASET_PATH = Path(__file__).resolve().parent.parent / "demo" / "sst2_demo.csv"
DEMO_DATASET_NAME = "SST-2 demo (1,000 movie-review sentences)"


def load_demo_dataset(session: Session, owner_id: int | None = None) -> tuple[Dataset, bool]:
    """Load the bundled SST-2 demo through the normal upload path; the dataset, and whether it is new."""
    digest = hashlib.sha256(DEMO_DATASET_PATH.read_bytes()).hexdigest()
    existing = session.exec(
        select(Dataset).where(Dataset.sha256 == digest, Dataset.owner_id == owner_id)
    ).first()
    if existing is not None:
        return existing, False
    with DEMO_DATASET_PATH.open("rb") as stream:
        return create_dataset(session, stream, DEMO_DATASET_PATH.name, DEMO_DATASET_NAME, owner_id), True


def check_validation_split(dataset: Dataset, fraction: float) -> None:
    """Refuse a held-out fraction that leaves no validation row or no training row."""
    if fraction <= 0:
        return
    held_out = round(dataset.row_count * fraction)
    if held_out < 1 or dataset.row_count - held_out < 1:
        raise InvalidSpec(
            f"validation_fraction {fraction} of {dataset.row_count} rows leaves {held_out} for validation and "
            f"{dataset.row_count - held_out} for training; both need at least 1 row. Choose another fraction, "
            "0 for no validation, or a validation dataset.",
            field="validation_fraction",
        )
