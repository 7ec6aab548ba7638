"""Import an adapter zip (one downloaded from a PEFT Studio, e.g. another team's) as your own adapter.

The zip is checked before anything is kept: size-capped while received, extracted only when no member leaves
the folder (``app.core.safety.safe_extract_zip``: no ``..``, absolute paths or symlinks), pickle files refused,
weights must be safetensors, ``studio.json`` must say the method, task and base model, and the base model must
be on this machine. The adapter is registered under a finished job of its own ("imported"), so pages, the API,
try-out and downloads treat it like a trained one.
"""

import json
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from sqlmodel import Session, select

from app.core.base_models import resolve_base_model
from app.core.errors import InvalidSpec
from app.core.files import receive_upload
from app.core.models import Adapter, Job, JobEvent, JobStatus, utcnow
from app.core.safety import UnsafeArchive, pickle_files, safe_extract_zip
from app.core.settings import get_settings
from app.core.storage import get_store
from app.services.quota import check_quota

STUDIO_FILE = "studio.json"


def _declared_size(archive: Path) -> int:
    """The unpacked size the archive's members declare (0 for a file that is not a zip: extraction says why)."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            return sum(info.file_size for info in bundle.infolist())
    except (zipfile.BadZipFile, OSError):
        return 0


def _adapter_root(folder: Path) -> Path:
    """The extracted folder, or its single subfolder when the zip wraps everything in one."""
    if (folder / STUDIO_FILE).is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith("__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / STUDIO_FILE).is_file():
        return entries[0]
    raise InvalidSpec(
        f"The archive has no {STUDIO_FILE} at its top: import a zip downloaded from a PEFT Studio adapter "
        "(GET /api/v1/adapters/{id}/download).",
        field="file",
    )


def _safetensors_params(path: Path) -> int:
    """Parameter count from a safetensors header (no tensor is loaded); refuses a file that is not one."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError("header too large")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise InvalidSpec(f"{path.name} is not a valid safetensors file ({exc}).", field="file") from None
    total = 0
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        count = 1
        for dim in info.get("shape", []):
            count *= int(dim)
        total += count
    return total


def _read_studio(root: Path) -> dict[str, Any]:
    try:
        studio = json.loads((root / STUDIO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidSpec(f"{STUDIO_FILE} in the archive cannot be read ({exc}).", field="file") from None
    if not isinstance(studio, dict):
        raise InvalidSpec(f"{STUDIO_FILE} in the archive is not an object.", field="file")
    for key in ("method", "task", "base_model"):
        if not isinstance(studio.get(key), str) or not studio[key]:
            raise InvalidSpec(f"{STUDIO_FILE} in the archive has no {key!r}.", field="file")
    from app.core.method_registry import registry

    if studio["method"] not in registry():
        raise InvalidSpec(
            f"The archive's method {studio['method']!r} is not one this studio has.", field="file"
        )
    return studio


def import_adapter(
    session: Session, stream: BinaryIO, filename: str | None, owner_id: int | None, name: str | None = None
) -> Adapter:
    """Check, store and register an adapter zip; on any problem nothing is kept."""
    limit = get_settings().max_upload_bytes
    work = Path(tempfile.mkdtemp(prefix="adapter-import-"))
    job: Job | None = None
    key: str | None = None
    try:
        archive = work / "upload.zip"
        receive_upload(stream, archive, limit, "The archive")
        # The quota counts the adapter as extracted: check the sizes the members declare before extracting
        # (safe_extract_zip stops a member that writes more than it declared).
        check_quota(session, owner_id, _declared_size(archive), "The adapter")
        safe_extract_zip(archive, work / "files", max_bytes=limit * 4)
        root = _adapter_root(work / "files")
        unsafe = pickle_files(root)
        if unsafe:
            raise UnsafeArchive(
                f"The archive holds pickle files ({', '.join(unsafe[:3])}), which run code when loaded; "
                "the studio takes safetensors only.",
                field="file",
            )
        weights = sorted(root.rglob("*.safetensors"))
        if not weights:
            raise InvalidSpec("The archive has no .safetensors weights.", field="file")
        studio = _read_studio(root)
        resolve_base_model(studio["base_model"])
        trainable = sum(_safetensors_params(path) for path in weights)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        size = sum((root / f).stat().st_size for f in files)
        title = ((name or "").strip() or f"imported {filename or 'adapter'}")[:200]
        spec_value = studio.get("spec")
        spec: dict[str, Any] = spec_value if isinstance(spec_value, dict) else {}
        now = utcnow()
        job = Job(
            name=title,
            status=JobStatus.succeeded,
            spec=spec,
            method=studio["method"],
            base_model=studio["base_model"],
            owner_id=owner_id,
            progress=1.0,
            started_at=now,
            finished_at=now,
        )
        session.add(job)
        session.flush()
        assert job.id is not None
        session.add(JobEvent(job_id=job.id, kind="status", message=f"imported from {filename or 'a zip'}"))
        key = get_store().job_key(job.id, "adapter")
        get_store().put_dir(root, key)
        labels_value = studio.get("labels")
        labels: list[Any] = labels_value if isinstance(labels_value, list) else []
        adapter = Adapter(
            job_id=job.id,
            owner_id=owner_id,
            name=title,
            method=studio["method"],
            task=studio["task"],
            base_model=studio["base_model"],
            storage_key=key,
            size_bytes=size,
            files=files,
            trainable_params=trainable,
            total_params=0,
            labels=[str(label) for label in labels],
            metrics={},
        )
        session.add(adapter)
        session.commit()
        session.refresh(adapter)
        return adapter
    except BaseException:
        session.rollback()
        if key is not None:
            get_store().delete(key)
        if job is not None and job.id is not None:
            for event in session.exec(select(JobEvent).where(JobEvent.job_id == job.id)).all():
                session.delete(event)
            stale = session.get(Job, job.id)
            if stale is not None:
                session.delete(stale)
            session.commit()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
