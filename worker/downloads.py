"""Fetch a Hub model into the Hub cache the workers share, reporting progress to its ModelDownload row.

Each file goes through ``huggingface_hub.hf_hub_download`` (which honours ``HF_ENDPOINT``, stores blobs in
the cache layout every loader reads, and resumes a dropped transfer with an HTTP Range request). Its
progress bar class is our hook: every chunk counts towards the row (bytes, files, speed, ETA), and a cancel
asked for in the row stops the transfer there. Files already finished stay in the cache, so the next
attempt fetches only the rest (huggingface_hub 2.x discards a half-written file, so that one restarts).

Refused before a byte of weights is fetched: a repository whose only weights are pickle files (unless the
admin allows them), and one with its own Python code that the admin has not allow-listed
(PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS). Every file is verified after download against the size and, for LFS
files, the sha256 that the Hub reports.

A job whose base model is a Hub id not cached yet downloads it as its first phase (``download_for_job``,
called by ``run_job`` before the model loads): the same download row and machinery, with the job's own
events saying how far it got, and the job's cancel stopping the transfer.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from app.core.base_models import will_download
from app.core.db import session_scope
from app.core.models import Job, JobStatus, ModelDownload, utcnow
from app.core.safety import remote_code_allowed
from app.core.settings import get_settings
from app.services.jobs import add_event
from app.services.model_downloads import ACTIVE, DOWNLOADS_OFF, hub_token_of
from app.services.models import hub_cache_dir
from worker.failures import ModelProblem

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".ot")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".gguf", ".onnx")
# How often progress reaches the database (and a cancel is noticed).
REPORT_SECONDS = 0.5
# A job's event log gets a download line at each of these steps (percent).
JOB_EVENT_STEP = 25

# Called with (done bytes, total bytes) after each progress report; raises DownloadCancelled to stop.
Watch = Callable[[int, int], None]


class DownloadRefused(Exception):
    """The repository may not be fetched (pickle-only weights, custom code not allowed, gated, ...)."""


class DownloadCancelled(Exception):
    """Someone cancelled the download; the files already finished stay in the cache."""


def choose_files(siblings: list[Any], allow_pickle: bool) -> list[Any]:
    """The repository files to fetch: everything but weights in other formats than safetensors (unless
    pickle weights are allowed); DownloadRefused when no usable weights remain."""
    names = [s.rfilename for s in siblings]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    chosen = []
    for sibling in siblings:
        name = sibling.rfilename
        if name.endswith(".safetensors") or not name.endswith(WEIGHT_SUFFIXES):
            chosen.append(sibling)
        elif allow_pickle and name.endswith(PICKLE_SUFFIXES) and not has_safetensors:
            chosen.append(sibling)
    if not any(s.rfilename.endswith(WEIGHT_SUFFIXES) for s in chosen):
        if any(n.endswith(PICKLE_SUFFIXES) for n in names):
            raise DownloadRefused(
                "This repository has only pickle weights (*.bin, *.pt), which can run code when loaded; the studio "
                "fetches safetensors only. Pick a repository with *.safetensors, or an admin sets "
                "PEFT_STUDIO_HUB_ALLOW_PICKLE=true (the loaders still refuse pickle weights)."
            )
        raise DownloadRefused("This repository has no model weights (*.safetensors).")
    return chosen


def needs_custom_code(names: list[str], config: dict[str, Any]) -> bool:
    """Whether the model brings its own Python code (``auto_map`` in its config, or ``*.py`` files)."""
    return bool(config.get("auto_map")) or any(n.endswith(".py") for n in names)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, sibling: Any) -> None:
    """Check a fetched file against the size and (LFS) sha256 the Hub reported; DownloadRefused otherwise."""
    size = sibling.lfs.size if sibling.lfs else sibling.size
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadRefused(f"{sibling.rfilename}: {actual} bytes fetched, the Hub reports {size}.")
    if sibling.lfs and _sha256(path) != sibling.lfs.sha256:
        raise DownloadRefused(f"{sibling.rfilename}: its sha256 differs from the one the Hub reports.")


@contextmanager
def hub_online() -> Iterator[None]:
    """Let huggingface_hub reach the network for this download only: ``serve`` runs workers with
    HF_HUB_OFFLINE=1 so that loaders never call out; the download is the one place that should."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class Reporter:
    """Counts bytes for one download and writes them to its row at most every REPORT_SECONDS."""

    def __init__(self, download_id: int, total_bytes: int, watch: Watch | None = None) -> None:
        self.download_id = download_id
        self.watch = watch
        self.total_bytes = total_bytes
        self.completed_bytes = 0  # files finished
        self.current_bytes = 0  # the file in flight, resumed part included
        self.fetched = 0  # bytes this run actually transferred (for the speed)
        self.started = time.monotonic()
        self.last_report = 0.0
        self.done_files = 0

    def add(self, count: int, fetched: bool = True) -> None:
        """``count`` more bytes of the current file (negative when huggingface_hub restarts a file)."""
        self.current_bytes += count
        if fetched:
            self.fetched += count
        if time.monotonic() - self.last_report >= REPORT_SECONDS:
            self.report()

    def file_done(self, size: int) -> None:
        """A file is fetched and verified."""
        self.completed_bytes += size
        self.current_bytes = 0
        self.done_files += 1
        self.report()

    def report(self) -> None:
        """Write the progress; DownloadCancelled when the row asks for a cancel."""
        self.last_report = time.monotonic()
        elapsed = max(self.last_report - self.started, 1e-6)
        speed = max(self.fetched, 0) / elapsed
        done = min(self.completed_bytes + self.current_bytes, self.total_bytes)
        with session_scope() as session:
            row = session.get(ModelDownload, self.download_id)
            if row is None:
                raise DownloadCancelled("the download was deleted")
            row.done_bytes = done
            row.done_files = self.done_files
            row.bytes_per_second = speed
            row.eta_seconds = (self.total_bytes - done) / speed if speed > 0 else None
            session.add(row)
            session.commit()
            if row.cancel_requested:
                raise DownloadCancelled("cancelled")
        if self.watch is not None:
            self.watch(done, self.total_bytes)


def _progress_class(reporter: Reporter) -> type:
    """A tqdm class that huggingface_hub drives while it transfers a file: it feeds the reporter."""
    from tqdm.auto import tqdm

    class Progress(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            initial = int(kwargs.get("initial") or 0)
            super().__init__(*args, **kwargs)
            reporter.add(initial, fetched=False)  # a resumed file's bytes already on disk

        def update(self, n: float | None = 1) -> bool | None:
            reporter.add(int(n or 0))
            return None

    return Progress


def _finish(download_id: int, status: str, error: str | None = None, **values: Any) -> None:
    with session_scope() as session:
        row = session.get(ModelDownload, download_id)
        if row is None:
            return
        row.status = status
        row.error = error
        row.finished_at = utcnow()
        for key, value in values.items():
            setattr(row, key, value)
        if status == "succeeded":
            row.done_bytes = row.total_bytes
            row.eta_seconds = 0.0
        session.add(row)
        session.commit()


def _start(session: Session, download: ModelDownload, worker_name: str) -> None:
    download.status = "running"
    download.worker = worker_name
    download.started_at = utcnow()
    download.error = None
    session.add(download)
    session.commit()


def run_download(download_id: int, worker_name: str = "worker", watch: Watch | None = None) -> None:
    """Fetch the download with this id into the shared Hub cache (skipped when cancelled or finished).

    ``watch`` (a job downloading its base model) sees each progress report and may stop the download.
    """
    with session_scope() as session:
        download = session.get(ModelDownload, download_id)
        # "running" too: a worker that died mid-download leaves its row running, and acks_late hands the task
        # to another worker, which carries on (the files already finished stay in the cache).
        if download is None or download.status not in ("queued", "running"):
            return
        cancelled = download.cancel_requested  # asked while its worker was gone
        model_id, revision, owner_id = download.model_id, download.revision, download.owner_id
        token = hub_token_of(session, owner_id)
        if not cancelled:
            _start(session, download, worker_name)
    if cancelled:
        _finish(download_id, "cancelled", "Cancelled; asking again fetches what is missing.")
        return
    try:
        if not get_settings().hub_downloads:
            raise DownloadRefused(DOWNLOADS_OFF)
        with hub_online():
            _fetch(download_id, model_id, revision, token, watch)
    except DownloadCancelled:
        _finish(download_id, "cancelled", "Cancelled; asking again fetches what is missing.")
    except Exception as exc:  # every failure is recorded on the row, in words a person can act on
        log.warning("download %s of %s failed: %s", download_id, model_id, exc.__class__.__name__)
        _finish(download_id, "failed", describe_failure(exc, model_id))


def describe_failure(exc: BaseException, model_id: str) -> str:
    """What went wrong, and what to do, without the token or a traceback."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, DownloadRefused):
        return str(exc)
    if isinstance(exc, GatedRepoError):
        return (
            f"{model_id} is gated: accept its licence on the Hub, then save a Hugging Face token with read access "
            "on your account page (/account; it is stored encrypted), and download again."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return f"{model_id} does not exist on the Hub (or is private: save a token that can read it)."
    if isinstance(exc, RevisionNotFoundError):
        return f"{model_id} has no such revision (branch, tag or commit)."
    if isinstance(exc, OfflineModeIsEnabled | LocalEntryNotFoundError):
        return (
            "The Hub could not be reached from the worker (HF_ENDPOINT); check its network, then try again."
        )
    return f"The download failed ({exc.__class__.__name__}); try again: finished files are kept."


def _fetch(
    download_id: int, model_id: str, revision: str, token: str | None, watch: Watch | None = None
) -> None:
    from huggingface_hub import HfApi, constants, hf_hub_download

    settings = get_settings()
    endpoint = constants.ENDPOINT
    cache = hub_cache_dir()
    info = HfApi(endpoint=endpoint).model_info(model_id, revision=revision, files_metadata=True, token=token)
    commit = info.sha or revision
    siblings = choose_files(list(info.siblings or []), settings.hub_allow_pickle)
    names = [s.rfilename for s in info.siblings or []]
    config: dict[str, Any] = {}
    if "config.json" in names:
        config_path = hf_hub_download(
            model_id, "config.json", revision=commit, cache_dir=cache, token=token, endpoint=endpoint
        )
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    if needs_custom_code(names, config) and not remote_code_allowed(model_id):
        raise DownloadRefused(
            f"{model_id} brings its own Python code (trust_remote_code), which the studio does not run unless the "
            "admin allow-lists it: PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS=" + json.dumps([model_id]) + "."
        )
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) or 0 for s in siblings}
    total = sum(sizes.values())
    with session_scope() as session:
        row = session.get(ModelDownload, download_id)
        assert row is not None
        row.total_bytes, row.total_files, row.commit_hash = total, len(siblings), commit
        row.files = [s.rfilename for s in siblings]
        session.add(row)
        session.commit()
    reporter = Reporter(download_id, total, watch)
    progress_class = _progress_class(reporter)
    reporter.report()
    for sibling in siblings:
        path = hf_hub_download(
            model_id,
            sibling.rfilename,
            revision=commit,
            cache_dir=cache,
            token=token,
            endpoint=endpoint,
            tqdm_class=progress_class,
        )
        verify(Path(path), sibling)
        reporter.file_done(sizes[sibling.rfilename])
    if revision != commit:  # a branch or tag: point it at the commit fetched, as snapshot_download does
        ref = cache / f"models--{model_id.replace('/', '--')}" / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    _finish(download_id, "succeeded", commit_hash=commit, done_files=len(siblings))


def _size(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} bytes"  # pragma: no cover


def _job_watch(job_id: int, model_id: str) -> Watch:
    """A watch that writes "downloading owner/name: 40 % of 1.2 GB" to the job's events every
    JOB_EVENT_STEP percent, and stops the download when the job is cancelled or no longer running here."""
    next_step = [0]

    def watch(done: int, total: int) -> None:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or job.cancel_requested or job.status != JobStatus.running:
                raise DownloadCancelled("the job was cancelled")
            percent = int(100 * done / total) if total else 0
            if total and next_step[0] <= percent < 100:
                add_event(
                    session, job_id, "download", f"downloading {model_id}: {percent} % of {_size(total)}"
                )
                session.commit()
                next_step[0] = (percent // JOB_EVENT_STEP + 1) * JOB_EVENT_STEP

    return watch


def _wait_for(download_id: int, watch: Watch) -> None:
    """Follow a download another worker runs (the same model asked for by someone else) until it ends."""
    while True:
        with session_scope() as session:
            row = session.get(ModelDownload, download_id)
            if row is None or row.status not in ACTIVE:
                return
            done, total = row.done_bytes, row.total_bytes
        try:
            watch(done, total)
        except DownloadCancelled:
            return
        time.sleep(REPORT_SECONDS)


def download_for_job(job_id: int, model_id: str, worker_name: str = "worker") -> bool:
    """A job's first phase: fetch its base model into the shared Hub cache when it is a Hub id not cached yet
    and Hub downloads are on (nothing to do otherwise). The download is an ordinary download row (listed on
    the Models page, fetched with the job owner's Hub token); the job's events say how far it got.

    Returns False when the job was cancelled during the download; raises ModelProblem when it failed.
    """
    if not will_download(model_id):
        return True
    watch = _job_watch(job_id, model_id)
    with session_scope() as session:
        job = session.get(Job, job_id)
        owner_id = job.owner_id if job is not None else None
        active = session.exec(
            select(ModelDownload).where(
                ModelDownload.model_id == model_id,
                ModelDownload.revision == "main",
                col(ModelDownload.status).in_(ACTIVE),
            )
        ).first()
        if active is None:
            row = ModelDownload(owner_id=owner_id, model_id=model_id, revision="main")
            session.add(row)
            session.flush()
            message = f"{model_id} is not in the model cache yet: downloading it first (download {row.id})"
        else:
            row = active
            message = f"{model_id} is being downloaded already (download {row.id}): waiting for it"
        download_id = row.id
        assert download_id is not None
        add_event(session, job_id, "download", message)
        session.commit()
    if active is None:
        run_download(download_id, worker_name, watch=watch)
    else:
        _wait_for(download_id, watch)
    with session_scope() as session:
        fetched = session.get(ModelDownload, download_id)
        job = session.get(Job, job_id)
        if job is None or job.cancel_requested or job.status != JobStatus.running:
            return False  # a download this job only waited for goes on for whoever started it
        if fetched is None or fetched.status != "succeeded":
            error = fetched.error if fetched is not None else "the download was deleted"
            raise ModelProblem(f"downloading {model_id} failed: {error}")
        add_event(
            session,
            job_id,
            "download",
            f"downloaded {model_id} ({_size(fetched.total_bytes)}, {fetched.total_files} files) into the model cache",
        )
        session.commit()
    return True
