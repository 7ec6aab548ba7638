"""The artifact store: where dataset files, checkpoints and adapters live.

Two backends behind the same methods, both through fsspec: a local folder (the default) or an S3-compatible
bucket (``PEFT_STUDIO_ARTIFACT_URL=s3://bucket/prefix``, e.g. MinIO). Code that must work on any host reads
with ``local_file``/``local_dir``/``get_file``/``get_dir`` (a local copy, cached under
``PEFT_STUDIO_ARTIFACT_CACHE_DIR`` for a bucket) and writes with ``put_file``/``put_dir``; ``path()`` exists
only for the local folder.

Keys are relative, generated paths (``datasets/<uuid>.csv``, ``jobs/7/adapter``); nothing a user typed
becomes part of a path.
"""

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

from app.core.settings import Settings, get_settings

_CACHE_MANIFEST = ".studio-cache.json"


def _check_key(key: str) -> str:
    """A key relative to the store's root, refused when it would leave it."""
    parts = PurePosixPath(key.replace("\\", "/")).parts
    if not parts or key.startswith("/") or any(part in ("..", "") for part in parts):
        raise ValueError(f"artifact key {key!r} leaves the artifact root")
    return "/".join(parts)


class ArtifactStore:
    """Artifacts addressed by key, in a local folder or a bucket (fsspec)."""

    def __init__(self, root: Path | str, cache_dir: Path | None = None, **storage_options: Any) -> None:
        import fsspec

        self.url = str(root)
        self.is_local = isinstance(root, Path) or "://" not in str(root) or str(root).startswith("file://")
        if self.is_local:
            self.root = Path(str(root).removeprefix("file://")).expanduser().resolve()
            self.root.mkdir(parents=True, exist_ok=True)
            self.fs = fsspec.filesystem("file")
            self._base = str(self.root)
            self.cache_dir = cache_dir or self.root / "cache"
        else:
            # The web app reads what workers wrote a moment ago: no cached listings.
            self.fs, self._base = fsspec.url_to_fs(str(root), use_listings_cache=False, **storage_options)
            self._base = self._base.rstrip("/")
            self.root = Path("/nonexistent")  # no local root; path() refuses
            if cache_dir is None:
                raise ValueError("a bucket-backed artifact store needs a local cache folder")
            self.cache_dir = cache_dir.expanduser().resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    # ---- keys and local paths -------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return f"{self._base}/{_check_key(key)}"

    def path(self, key: str) -> Path:
        """The local path of a key (local folder only); refuses keys that would leave the root."""
        if not self.is_local:
            raise RuntimeError(
                f"the artifact store is a bucket ({self.url}); read {key!r} with local_file/get_dir instead"
            )
        candidate = (self.root / key).resolve()
        if not candidate.is_relative_to(self.root):
            raise ValueError(f"artifact key {key!r} leaves the artifact root")
        return candidate

    def new_dataset_key(self, fmt: str) -> str:
        """A fresh, generated key for an uploaded dataset file."""
        return f"datasets/{uuid.uuid4().hex}.{fmt}"

    def temp_path(self) -> Path:
        """A fresh local path for a file being received; callers delete or move it."""
        folder = (self.root if self.is_local else self.cache_dir) / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{uuid.uuid4().hex}.part"

    def scratch_dir(self, name: str) -> Path:
        """A local working folder (e.g. the Trainer's output), never shared between hosts; created empty."""
        folder = self.cache_dir / "scratch" / f"{_check_key(name).replace('/', '-')}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def job_key(self, job_id: int, *parts: str) -> str:
        """The key of something a job writes (its adapter, checkpoints)."""
        return "/".join(["jobs", str(job_id), *parts])

    # ---- queries --------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """True when a file or folder is stored under the key."""
        if self.is_local:
            return self.path(key).exists()
        full = self._full(key)
        return bool(self.fs.exists(full) or self.fs.find(full, maxdepth=None))

    def list(self, prefix: str) -> list[str]:
        """Keys of the files under a prefix, sorted."""
        if self.is_local:
            root = self.path(prefix)
            if not root.is_dir():
                return []
            return sorted(str(p.relative_to(self.root)) for p in root.rglob("*") if p.is_file())
        full = self._full(prefix)
        return sorted(path[len(self._base) + 1 :] for path in self.fs.find(full) if path != full)

    @contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        """The stored file as a binary stream (streamed from the bucket, not downloaded first)."""
        with self.fs.open(self._full(key), "rb") as stream:
            yield stream

    # ---- writes ---------------------------------------------------------------------------------

    def put_file(self, local: Path, key: str) -> None:
        """Store a local file under the key (replacing what was there)."""
        if not self.is_local:
            self.fs.put_file(str(local), self._full(key))
            return
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if local.resolve() == target:
            return
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        shutil.copyfile(local, staging)
        os.replace(staging, target)

    def put_dir(self, local: Path, key: str) -> None:
        """Store a local folder under the key, replacing the folder that was there."""
        if not self.is_local:
            self.delete(key)
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                self.fs.put_file(str(file), f"{self._full(key)}/{file.relative_to(local).as_posix()}")
            return
        target = self.path(key)
        if local.resolve() == target:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        shutil.copytree(local, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)

    def delete(self, key: str) -> None:
        """Remove a file or folder if it exists."""
        if not self.is_local:
            full = self._full(key)
            if self.fs.find(full) or self.fs.exists(full):
                self.fs.rm(full, recursive=True)
            return
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    # ---- reads into local copies ----------------------------------------------------------------

    def get_file(self, key: str, local: Path) -> Path:
        """Copy the file stored under the key to a local path; returns the path."""
        local.parent.mkdir(parents=True, exist_ok=True)
        if self.is_local:
            source = self.path(key)
            if not source.is_file():
                raise FileNotFoundError(f"no artifact stored under {key!r}")
            if source != local.resolve():
                shutil.copyfile(source, local)
            return local
        # Download beside the target, then rename: concurrent readers (DDP ranks) never see half a file.
        staging = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        try:
            self.fs.get_file(self._full(key), str(staging))
            os.replace(staging, local)
        finally:
            staging.unlink(missing_ok=True)
        return local

    def get_dir(self, key: str, local: Path) -> Path:
        """Copy the folder stored under the key to a local folder; returns the folder."""
        if self.is_local:
            source = self.path(key)
            if not source.is_dir():
                raise FileNotFoundError(f"no artifact folder stored under {key!r}")
            if source != local.resolve():
                shutil.copytree(source, local, dirs_exist_ok=True)
            return local
        prefix = _check_key(key)
        keys = self.list(prefix)
        if not keys:
            raise FileNotFoundError(f"no artifact folder stored under {key!r}")
        for file_key in keys:
            self.get_file(file_key, local / file_key[len(prefix) + 1 :])
        return local

    def local_file(self, key: str) -> Path:
        """A local copy of a stored file: the file itself for a local folder, else a cached download."""
        if self.is_local:
            path = self.path(key)
            if not path.is_file():
                raise FileNotFoundError(f"no artifact stored under {key!r}")
            return path
        cached = self.cache_dir / "files" / _check_key(key)
        size = self.fs.info(self._full(key)).get("size")
        if cached.is_file() and cached.stat().st_size == size:
            return cached
        return self.get_file(key, cached)

    def local_dir(self, key: str) -> Path:
        """A local copy of a stored folder: the folder itself for a local folder, else a cached download.

        The cache is refreshed when the bucket's listing (names, sizes, tags) differs from what was fetched.
        """
        if self.is_local:
            path = self.path(key)
            if not path.is_dir():
                raise FileNotFoundError(f"no artifact folder stored under {key!r}")
            return path
        full = self._full(key)
        listing = self.fs.find(full, detail=True)
        if not listing:
            raise FileNotFoundError(f"no artifact folder stored under {key!r}")
        signature = sorted(
            [name[len(full) + 1 :], info.get("size"), str(info.get("ETag") or info.get("LastModified") or "")]
            for name, info in listing.items()
        )
        cached = self.cache_dir / "dirs" / _check_key(key)
        manifest = cached / _CACHE_MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()) == signature:
            return cached
        staging = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.part")
        try:
            self.get_dir(key, staging)
            (staging / _CACHE_MANIFEST).write_text(json.dumps(signature))
            if cached.exists():
                shutil.rmtree(cached, ignore_errors=True)
            staging.rename(cached)
        except OSError:
            # Another process filled the cache at the same moment: use its copy.
            if not manifest.is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cached


def store_from_settings(settings: Settings) -> ArtifactStore:
    """The artifact store the settings describe (a bucket when artifact_url is set, else the local folder)."""
    if not settings.artifact_url:
        return ArtifactStore(settings.resolved_artifact_root, settings.resolved_artifact_cache_dir)
    options: dict[str, Any] = {}
    if settings.artifact_url.startswith("s3://"):
        client_kwargs: dict[str, Any] = {}
        if settings.s3_endpoint_url:
            options["endpoint_url"] = settings.s3_endpoint_url
        if settings.s3_region:
            client_kwargs["region_name"] = settings.s3_region
        if settings.s3_access_key_id:
            options["key"] = settings.s3_access_key_id
        if settings.s3_secret_access_key:
            options["secret"] = settings.s3_secret_access_key
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
    return ArtifactStore(settings.artifact_url, settings.resolved_artifact_cache_dir, **options)


def get_store() -> ArtifactStore:
    """The configured artifact store."""
    return store_from_settings(get_settings())
