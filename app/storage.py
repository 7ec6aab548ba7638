"""The artifact store: where dataset files, checkpoints and adapters live.

Keys are relative, generated paths (``datasets/<uuid>.csv``, ``jobs/7/adapter``); nothing a user typed
becomes part of a path.
"""

import shutil
import uuid
from pathlib import Path

from app.settings import get_settings


class ArtifactStore:
    """A local folder of artifacts addressed by key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        """The local path of a key; refuses keys that would leave the root."""
        candidate = (self.root / key).resolve()
        if not candidate.is_relative_to(self.root.resolve()):
            raise ValueError(f"artifact key {key!r} leaves the artifact root")
        return candidate

    def new_dataset_key(self, fmt: str) -> str:
        """A fresh, generated key for an uploaded dataset file."""
        return f"datasets/{uuid.uuid4().hex}.{fmt}"

    def temp_path(self) -> Path:
        """A fresh path for a file being received; callers delete or move it."""
        folder = self.root / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{uuid.uuid4().hex}.part"

    def job_key(self, job_id: int, *parts: str) -> str:
        """The key of something a job writes (its adapter, checkpoints)."""
        return "/".join(["jobs", str(job_id), *parts])

    def exists(self, key: str) -> bool:
        """True when a file or folder is stored under the key."""
        return self.path(key).exists()

    def put_file(self, local: Path, key: str) -> None:
        """Store a local file under the key (replacing what was there)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if local.resolve() != target:
            shutil.copyfile(local, target)

    def get_file(self, key: str, local: Path) -> Path:
        """Copy the file stored under the key to a local path; returns the path."""
        local.parent.mkdir(parents=True, exist_ok=True)
        source = self.path(key)
        if source != local.resolve():
            shutil.copyfile(source, local)
        return local

    def put_dir(self, local: Path, key: str) -> None:
        """Store a local folder under the key, replacing the folder that was there."""
        target = self.path(key)
        if local.resolve() == target:
            return
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        shutil.copytree(local, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)

    def get_dir(self, key: str, local: Path) -> Path:
        """Copy the folder stored under the key to a local folder; returns the folder."""
        source = self.path(key)
        if source != local.resolve():
            shutil.copytree(source, local, dirs_exist_ok=True)
        return local

    def list(self, prefix: str) -> list[str]:
        """Keys of the files under a prefix, sorted."""
        root = self.path(prefix)
        if not root.is_dir():
            return []
        base = self.root.resolve()
        return sorted(str(p.relative_to(base)) for p in root.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        """Remove a file or folder if it exists."""
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def get_store() -> ArtifactStore:
    """The configured artifact store."""
    root = get_settings().resolved_artifact_root
    root.mkdir(parents=True, exist_ok=True)
    return ArtifactStore(root)
