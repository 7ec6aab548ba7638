"""Safety of what users hand us that both processes check: archives and base models.

- ``safe_extract_zip``: extracts a zip only when every member stays inside the target folder: no absolute
  paths, no ``..``, no symlinks, no device files, a cap on members and on uncompressed bytes (zip bombs).
  Python's ``tarfile`` has extraction filters for this (``filter="data"``); ``zipfile`` has none, and no
  maintained library adds one, so the checks are written here, before anything is written to disk.
- ``check_base_model``: a base model loads from safetensors and may hold no pickle file at all (pickle
  checkpoints — ``.bin``, ``.pt``, ``.ckpt`` — run code when loaded), and may not need its own Python code
  (``auto_map`` in config.json) unless the admin lists it in ``PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS``.

Request bodies are counted in ``app/http/safety.py`` (the web process only).
"""

import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from app.core.errors import InvalidSpec, PayloadTooLarge, StudioError
from app.core.settings import get_settings

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
MAX_ARCHIVE_MEMBERS = 10_000


class UnsafeArchive(StudioError):
    status_code = 422


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if "\x00" in name or "\\" in name:
        return "has a backslash or NUL in its name"
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in path.parts:
        return "points outside the folder (..)"
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: the zip tool recorded no file type
        return "is not a regular file"
    return None


def safe_extract_zip(archive: Path, target: Path, max_bytes: int | None = None) -> list[str]:
    """Extract ``archive`` into ``target`` after checking every member; returns the files' relative paths.

    Nothing is written unless the whole archive passes (UnsafeArchive names the first bad member).
    """
    limit = max_bytes if max_bytes is not None else get_settings().max_upload_bytes * 4
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeArchive(f"The upload is not a readable zip archive ({exc}).", field="file") from None
    with bundle:
        members = bundle.infolist()
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise UnsafeArchive(
                f"The archive has {len(members):,} members; the limit is {MAX_ARCHIVE_MEMBERS:,}."
            )
        total = 0
        root = target.resolve()
        for info in members:
            problem = _member_problem(info)
            if problem is None and not (root / info.filename).resolve().is_relative_to(root):
                problem = "points outside the folder"
            if problem:
                raise UnsafeArchive(
                    f"The archive member {info.filename!r} {problem}; it was refused.", field="file"
                )
            total += info.file_size
            if total > limit:
                raise PayloadTooLarge(
                    f"The archive unpacks to more than {limit:,} bytes; it was refused.", field="file"
                )
        target.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        for info in members:
            if info.is_dir():
                (root / info.filename).mkdir(parents=True, exist_ok=True)
                continue
            destination = root / info.filename
            destination.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with bundle.open(info) as source, destination.open("wb") as out:
                while chunk := source.read(1024 * 1024):
                    written += len(chunk)
                    if written > info.file_size:  # the header lied about the size
                        raise UnsafeArchive(f"The archive member {info.filename!r} is larger than it says.")
                    out.write(chunk)
            files.append(str(PurePosixPath(info.filename)))
    return sorted(files)


def pickle_files(folder: Path) -> list[str]:
    """Files in ``folder`` that would be unpickled when loaded (and may run code)."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES
    )


def remote_code_allowed(model_id: str) -> bool:
    """True when the admin allows this base model to run its own code (trust_remote_code)."""
    return model_id in get_settings().trust_remote_code_models


def check_base_model(model_id: str, folder: Path, config: dict[str, Any]) -> None:
    """Refuse a base model folder that holds pickle files, or one that needs its own code and is not allowed.

    Any pickle file refuses the folder, even beside safetensors weights: a tiny or zero-tensor
    ``model.safetensors`` next to the real ``pytorch_model.bin`` passed a "has safetensors" check, and whether a
    loader then reads the pickle depends on every library in the chain. There is no exception (for admins
    neither): converting is one ``save_pretrained(..., safe_serialization=True)``, and downloading only
    ``*.safetensors``/``*.json``/tokenizer files from the Hub gives a folder without pickles.
    """
    if config.get("auto_map") and not remote_code_allowed(model_id):
        raise InvalidSpec(
            f"Base model {model_id!r} needs its own Python code (auto_map in config.json), which the studio does "
            "not run unless the admin allows it for this model (PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS).",
            field="base_model",
        )
    unsafe = pickle_files(folder) if folder.is_dir() else []
    if unsafe:
        raise InvalidSpec(
            f"Base model {model_id!r} holds pickle files ({', '.join(unsafe[:3])}), which run code when loaded; "
            "the studio loads safetensors only and refuses a folder with any pickle in it. Convert the model "
            "(save_pretrained(..., safe_serialization=True)) or remove the pickle files, and try again.",
            field="base_model",
        )


def model_load_kwargs(model_id: str) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` of a base model: safetensors only, remote code as allowed."""
    return {"use_safetensors": True, "trust_remote_code": remote_code_allowed(model_id)}
