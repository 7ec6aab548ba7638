"""Files in and out of the web process: an upload received to disk under the byte cap, a folder zipped.

Both exist once here, for the dataset upload, the OpenAI file upload, the adapter import, and the checkpoint, merged-model and
TensorBoard downloads. ``shutil.make_archive`` would zip a folder too, but it cannot write members under a
chosen root folder into a given file, nor stream; ``zipfile`` does both in a few lines.
"""

import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO

from app.core.errors import PayloadTooLarge

CHUNK_BYTES = 1024 * 1024


def receive_upload(stream: BinaryIO, target: Path, limit: int, what: str = "The file") -> int:
    """Copy an uploaded file to ``target`` in chunks, stopping with 413 once it passes ``limit`` bytes (the
    caller removes ``target`` then); returns its size."""
    size = 0
    with target.open("wb") as out:
        while chunk := stream.read(CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"{what} is larger than the upload limit of {limit:,} bytes (PEFT_STUDIO_MAX_UPLOAD_BYTES).",
                    field="file",
                )
            out.write(chunk)
    return size


def zip_folder(folder: Path, target: Path | None = None, *, prefix: str = "archive-", root: str = "") -> Path:
    """Zip every file under ``folder`` (deflated, in name order) into ``target``, or into a new temporary file
    named ``<prefix>…zip`` that the caller deletes; members are relative to ``folder``, under ``root`` when
    given. A failed zip leaves no file behind."""
    if target is None:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=".zip")
        raw = open(handle, "wb")  # closed by the `with` below
        target = Path(name)
    else:
        raw = target.open("wb")
    try:
        with raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    member = path.relative_to(folder)
                    archive.write(path, arcname=str(Path(root) / member if root else member))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target
