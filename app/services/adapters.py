"""Adapters: list, describe, package for download, and try out."""

import asyncio
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, func, select

from app.core.errors import InvalidSpec, NotFound
from app.core.models import Adapter, AdapterPublic
from app.core.storage import get_store
from app.core.tasks import CLASSIFICATION

# Try-out runs in this process on one dedicated thread: the event loop never blocks, the warm base model is
# shared by every request, and a prediction costs no queue round trip (see docs/architecture.md).
inference_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

MAX_PREDICT_TEXTS = 64


def adapter_public(adapter: Adapter) -> AdapterPublic:
    """The public shape of an adapter."""
    percent = 100.0 * adapter.trainable_params / adapter.total_params if adapter.total_params else 0.0
    return AdapterPublic.model_validate(adapter, update={"trainable_percent": round(percent, 4)})


def list_adapters(
    session: Session, offset: int = 0, limit: int = 100, owner_id: int | None = None
) -> tuple[list[Adapter], int]:
    """Adapters, newest first, and how many there are (only ``owner_id``'s when given)."""
    where = [Adapter.owner_id == owner_id] if owner_id is not None else []
    count = session.exec(select(func.count()).select_from(Adapter).where(*where)).one()
    rows = session.exec(
        select(Adapter).where(*where).order_by(col(Adapter.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), count


def get_adapter(session: Session, adapter_id: int, owner_id: int | None = None) -> Adapter:
    """One adapter, or NotFound (also when ``owner_id`` is given and it belongs to someone else)."""
    adapter = session.get(Adapter, adapter_id)
    if adapter is None or (owner_id is not None and adapter.owner_id != owner_id):
        raise NotFound(f"Adapter {adapter_id} does not exist.")
    return adapter


def adapter_folder(adapter: Adapter) -> Path:
    """A local folder with the adapter's files (a cached copy when the artifact store is a bucket)."""
    try:
        return get_store().local_dir(adapter.storage_key)
    except FileNotFoundError:
        raise NotFound(f"The files of adapter {adapter.id} are missing from the artifact store.") from None


def build_archive(adapter: Adapter) -> Path:
    """A zip of the adapter folder in a temporary file (the caller deletes it).

    The files are streamed from the artifact store into the zip, so a bucket's files are served as stored.
    """
    store = get_store()
    prefix = adapter.storage_key.rstrip("/")
    keys = store.list(prefix)
    if not keys:
        raise NotFound(f"The files of adapter {adapter.id} are missing from the artifact store.")
    handle, name = tempfile.mkstemp(prefix=f"adapter-{adapter.id}-", suffix=".zip")
    try:
        with (
            open(handle, "wb") as raw,
            zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        ):
            for key in keys:
                with store.open(key) as source, archive.open(key[len(prefix) + 1 :], "w") as target:
                    shutil.copyfileobj(source, target, 1024 * 1024)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def remove_file(path: Path) -> None:
    """Delete a temporary file (used as a background task after a download)."""
    path.unlink(missing_ok=True)


def delete_adapter(session: Session, adapter_id: int, owner_id: int | None = None) -> None:
    """Delete an adapter and its files."""
    adapter = get_adapter(session, adapter_id, owner_id)
    key = adapter.storage_key
    session.delete(adapter)
    session.commit()
    get_store().delete(key)


async def predict(adapter: Adapter, texts: list[str]) -> list[dict[str, Any]]:
    """Class probabilities for each text, computed on the warm base model with this adapter switched in."""
    if not texts:
        raise InvalidSpec("Send at least one text.", field="texts")
    if len(texts) > MAX_PREDICT_TEXTS:
        raise InvalidSpec(f"Send at most {MAX_PREDICT_TEXTS} texts per request.", field="texts")
    if adapter.task != CLASSIFICATION:
        raise InvalidSpec(f"Adapter {adapter.id} is a {adapter.task} adapter; use generate.", field="adapter")
    folder = adapter_folder(adapter)

    def run() -> list[dict[str, Any]]:
        from worker.inference import classify  # heavy imports stay out of web start-up

        return classify(adapter.id or 0, folder, texts)

    return await asyncio.get_running_loop().run_in_executor(inference_thread, run)
