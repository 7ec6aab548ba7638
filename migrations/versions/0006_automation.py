"""automation: webhooks, their delivery log, and the OpenAI-compatible API's job links

Revision ID: 0006
Revises: 0001
Create Date: 2026-11-26 04:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("url", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("secret", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_owner_id"), ["owner_id"], unique=False)

    op.create_table(
        "webhookdelivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("event_type", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("locked_until", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("attempt_log", sa.JSON(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("delivered_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhookdelivery", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhookdelivery_webhook_id"), ["webhook_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhookdelivery_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index("ix_webhookdelivery_event", ["webhook_id", "job_id", "event_type"], unique=True)
        batch_op.create_index("ix_webhookdelivery_due", ["status", "next_attempt_at"], unique=False)

    op.create_table(
        "finetuningjoblink",
        sa.Column("job_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
        sa.Column("suffix", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    with op.batch_alter_table("finetuningjoblink", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_finetuningjoblink_owner_id"), ["owner_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("finetuningjoblink", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_finetuningjoblink_owner_id"))
    op.drop_table("finetuningjoblink")
    with op.batch_alter_table("webhookdelivery", schema=None) as batch_op:
        batch_op.drop_index("ix_webhookdelivery_due")
        batch_op.drop_index("ix_webhookdelivery_event")
        batch_op.drop_index(batch_op.f("ix_webhookdelivery_owner_id"))
        batch_op.drop_index(batch_op.f("ix_webhookdelivery_webhook_id"))
    op.drop_table("webhookdelivery")
    with op.batch_alter_table("webhook", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_owner_id"))
    op.drop_table("webhook")
