"""The audit trail: who created, cancelled, downloaded, deleted what, and who signed in or made tokens.

Routes call ``record`` after the action succeeded (the row is committed with it or right after); the admin
reads the trail with ``GET /api/v1/audit``.
"""

from sqlmodel import Session, col, func, select

from app.core.models import AuditEvent, User


def record(
    session: Session,
    user: User | None,
    action: str,
    object_type: str,
    object_id: int | None = None,
    detail: str = "",
) -> None:
    """Write one audit event, e.g. ``record(session, user, "delete", "dataset", 3)``."""
    session.add(
        AuditEvent(
            user_id=user.id if user is not None else None,
            username=user.username if user is not None else "",
            action=action[:40],
            object_type=object_type[:40],
            object_id=object_id,
            detail=detail[:2000],
        )
    )
    session.commit()


def list_events(
    session: Session,
    offset: int = 0,
    limit: int = 100,
    user_id: int | None = None,
    object_type: str | None = None,
    object_id: int | None = None,
) -> tuple[list[AuditEvent], int]:
    """Audit events, newest first, optionally for one user or one object; and how many match."""
    conditions = []
    if user_id is not None:
        conditions.append(AuditEvent.user_id == user_id)
    if object_type is not None:
        conditions.append(AuditEvent.object_type == object_type)
    if object_id is not None:
        conditions.append(AuditEvent.object_id == object_id)
    count = session.exec(select(func.count()).select_from(AuditEvent).where(*conditions)).one()
    rows = session.exec(
        select(AuditEvent).where(*conditions).order_by(col(AuditEvent.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), count
