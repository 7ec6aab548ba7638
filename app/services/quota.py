"""Per-user limits: the storage quota (PEFT_STUDIO_STORAGE_QUOTA_BYTES) and the cap on concurrent jobs.

The cap on queued and running jobs is set per user by the admin (``User.max_concurrent_jobs``); a new job
past it is refused with 429 (``check_job_cap``).

The storage quota counts what a user's files take on disk, unpacked: a user's usage is the stored size of their datasets plus the unpacked size of their adapters (trained or
imported: an imported zip counts as extracted, since a 2.25 MB zip unpacked to 820 MB). An upload is checked
before it is kept — an adapter zip by the sizes its members declare, before anything is extracted — and one
that would take the user past the quota is refused with 413, naming the usage and the quota. Admins, and rows
without an owner, are not limited.
"""

from sqlmodel import Session, col, func, select

from app.core.errors import PayloadTooLarge, TooManyJobs
from app.core.models import Adapter, Dataset, Job, JobStatus, User
from app.core.settings import get_settings


def _gib(size: int) -> str:
    return f"{size / 1024**3:,.2f} GiB"


def storage_used(session: Session, owner_id: int) -> int:
    """Bytes the user's datasets and adapters take (adapters unpacked)."""
    datasets = session.exec(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.owner_id == owner_id)
    ).one()
    adapters = session.exec(
        select(func.coalesce(func.sum(Adapter.size_bytes), 0)).where(Adapter.owner_id == owner_id)
    ).one()
    return int(datasets or 0) + int(adapters or 0)


def check_quota(session: Session, owner_id: int | None, adding: int, what: str = "The upload") -> None:
    """Refuse (413) to add ``adding`` bytes for a user whose usage would then exceed the quota."""
    quota = get_settings().storage_quota_bytes
    if not quota or owner_id is None:
        return
    user = session.get(User, owner_id)
    if user is None or user.is_admin:
        return
    used = storage_used(session, owner_id)
    if used + adding > quota:
        raise PayloadTooLarge(
            f"{what} needs {_gib(adding)} ({adding:,} bytes unpacked); you use {_gib(used)} of your "
            f"{_gib(quota)} storage quota ({used:,} of {quota:,} bytes, PEFT_STUDIO_STORAGE_QUOTA_BYTES). "
            "Delete datasets or adapters you no longer need, or ask the admin for more room.",
            field="file",
        )


def check_job_cap(session: Session, owner_id: int | None) -> None:
    """TooManyJobs when the owner already has as many queued and running jobs as the admin allows."""
    if owner_id is None:
        return
    user = session.get(User, owner_id)
    if user is None or user.max_concurrent_jobs is None:
        return
    active = session.exec(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_id == owner_id, col(Job.status).in_([JobStatus.queued, JobStatus.running]))
    ).one()
    if active >= user.max_concurrent_jobs:
        raise TooManyJobs(
            f"You have {active} queued or running job(s); your limit is {user.max_concurrent_jobs}. "
            "Wait for one to finish or cancel one (the admin sets the limit)."
        )
