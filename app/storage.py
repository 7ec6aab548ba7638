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
