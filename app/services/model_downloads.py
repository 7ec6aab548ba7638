"""Hub downloads: a person asks for ``owner/name`` (and a revision); a worker fetches it into the Hub cache the
workers share (worker/downloads.py) and writes its progress to the row, which the web streams over SSE.

Also the users' Hugging Face tokens for gated models: stored encrypted with a key derived from the studio's
secret key (Fernet from ``cryptography``: authenticated encryption, a maintained library), readable only by the
worker that uses them, never returned or logged.
"""

import base64
import hashlib
from typing import TYPE_CHECKING

from sqlmodel import Session, col, select

from app.core.errors import Conflict, InvalidSpec, NotFound, ServiceUnavailable
from app.core.models import HubToken, ModelDownload, User, utcnow
from app.core.queue import get_celery
from app.core.settings import get_settings
from app.services.models import check_model_id

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

DOWNLOAD_TASK = "peft_studio.download_model"
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
DOWNLOADS_OFF = (
    "Hub downloads are off: this studio uses only models already in its Hub cache. An admin turns them on "
    "with PEFT_STUDIO_HUB_DOWNLOADS=true (the workers then reach HF_ENDPOINT, https://huggingface.co by default)."
)


def _fernet() -> "Fernet":
    from cryptography.fernet import Fernet

    key = hashlib.sha256(b"peft-studio hub token\0" + get_settings().secret_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def save_hub_token(session: Session, user: User, token: str) -> None:
    """Store (or replace) a user's Hugging Face token, encrypted; it is never shown again."""
    token = token.strip()
    if not token or len(token) > 500 or any(c.isspace() for c in token):
        raise InvalidSpec("A Hugging Face token is one word (hf_...), at most 500 characters.", field="token")
    assert user.id is not None
    row = session.get(HubToken, user.id) or HubToken(user_id=user.id, encrypted="")
    row.encrypted = _fernet().encrypt(token.encode()).decode()
    row.created_at = utcnow()
    session.add(row)
    session.commit()


def delete_hub_token(session: Session, user: User) -> bool:
    """Forget a user's Hugging Face token; False when none was saved."""
    row = session.get(HubToken, user.id)
    if row is None:
        return False
    session.delete(row)
    session.commit()
    return True


def has_hub_token(session: Session, user_id: int | None) -> bool:
    """Whether this user saved a Hugging Face token."""
    return user_id is not None and session.get(HubToken, user_id) is not None


def hub_token_of(session: Session, user_id: int | None) -> str | None:
    """The decrypted token of a user, for the worker's Hub requests only (None when none or unreadable, e.g.
    after the secret key changed: the user saves it again)."""
    from cryptography.fernet import InvalidToken

    row = session.get(HubToken, user_id) if user_id is not None else None
    if row is None:
        return None
    try:
        return _fernet().decrypt(row.encrypted.encode()).decode()
    except InvalidToken:
        return None


def start_download(session: Session, user: User, model_id: str, revision: str | None = None) -> ModelDownload:
    """Queue a download of a Hub model into the shared cache; refused when downloads are off or the same
    model and revision is already being fetched."""
    if not get_settings().hub_downloads:
        raise ServiceUnavailable(DOWNLOADS_OFF)
    model_id = check_model_id(model_id)
    revision = (revision or "main").strip() or "main"
    if len(revision) > 200 or any(c.isspace() for c in revision) or ".." in revision:
        raise InvalidSpec(f"{revision!r} is not a branch, tag or commit.", field="revision")
    active = session.exec(
        select(ModelDownload).where(
            ModelDownload.model_id == model_id,
            ModelDownload.revision == revision,
            col(ModelDownload.status).in_(ACTIVE),
        )
    ).first()
    if active is not None:
        raise Conflict(f"{model_id}@{revision} is already being downloaded (download {active.id}).")
    download = ModelDownload(owner_id=user.id, model_id=model_id, revision=revision)
    session.add(download)
    session.commit()
    session.refresh(download)
    get_celery().send_task(DOWNLOAD_TASK, args=[download.id], queue=get_settings().queue_name)
    return download


def list_downloads(session: Session, limit: int = 50) -> list[ModelDownload]:
    """The latest downloads, newest first (the cache is shared, so everyone sees them)."""
    query = select(ModelDownload).order_by(col(ModelDownload.id).desc()).limit(limit)
    return list(session.exec(query).all())


def get_download(session: Session, download_id: int) -> ModelDownload:
    """One download, or NotFound."""
    download = session.get(ModelDownload, download_id)
    if download is None:
        raise NotFound(f"Download {download_id} does not exist.")
    return download


def cancel_download(session: Session, user: User, download_id: int) -> ModelDownload:
    """Cancel a download (its owner or an admin): a queued one at once, a running one at the worker's next
    progress report (within a second); finished files stay in the cache, so asking again fetches the rest."""
    from app.core.errors import Forbidden

    download = get_download(session, download_id)
    if download.owner_id != user.id and not user.is_admin:
        raise Forbidden("Only the person who started a download, or an admin, can cancel it.")
    if download.status in FINISHED:
        raise Conflict(f"Download {download_id} has already {download.status}.")
    download.cancel_requested = True
    if download.status == "queued":
        download.status = "cancelled"
        download.finished_at = utcnow()
    session.add(download)
    session.commit()
    session.refresh(download)
    return download


def progress(download: ModelDownload) -> dict[str, object]:
    """The JSON shape of a download and its progress."""
    data = download.model_dump()
    for key in ("created_at", "started_at", "finished_at"):
        data[key] = data[key].isoformat() if data[key] else None
    data["percent"] = (
        round(100 * download.done_bytes / download.total_bytes, 1) if download.total_bytes else 0.0
    )
    return data
