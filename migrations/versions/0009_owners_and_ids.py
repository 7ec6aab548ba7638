"""owners and ids: adapters get their job's owner, metric points an attempt, SQLite ids are never reused

Revision ID: 0009_owners_and_ids
Revises: 0007
Create Date: 2026-12-02 19:50:00

- ``adapter.owner_id`` was left empty by the worker (a non-admin's own adapters answered 404 to them, and the
  next start gave them to the admin): every adapter takes its job's owner.
- ``metricpoint.attempt``: which start of the job logged a point, so a resumed run's points are told apart.
- SQLite: the tables whose ids are public are rebuilt with ``AUTOINCREMENT`` (``sqlite_autoincrement``), so a
  deleted highest id is never handed out again (a resume deletes the points after its checkpoint, and a live
  stream continuing by id then got the old run's values). Postgres sequences never reuse ids: nothing to do.
  The rebuild needs foreign keys off (a parent table is dropped and renamed back); migrations/env.py turns them
  off around every SQLite migration and checks them afterwards.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_owners_and_ids"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every table whose integer id reaches URLs, the API or SSE event ids (app/models.py AUTOINCREMENT).
AUTOINCREMENT_TABLES = (
    "dataset",
    "job",
    "jobevent",
    "metricpoint",
    "adapter",
    "checkpoint",
    "user",
    "apitoken",
    "auditevent",
    "sweep",
    "webhook",
    "webhookdelivery",
    "worker",
)


def upgrade() -> None:
    op.execute(
        "UPDATE adapter SET owner_id = (SELECT job.owner_id FROM job WHERE job.id = adapter.job_id) "
        "WHERE owner_id IS NULL"
    )
    with op.batch_alter_table("metricpoint", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
    if op.get_bind().dialect.name == "sqlite":
        for table in AUTOINCREMENT_TABLES:
            with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
                pass


def downgrade() -> None:
    with op.batch_alter_table("metricpoint", schema=None) as batch_op:
        batch_op.drop_column("attempt")
