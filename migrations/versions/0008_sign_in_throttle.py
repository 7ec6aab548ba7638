"""sign-in throttle: failed sign-ins per account and per client address

Revision ID: 0008_sign_in_throttle
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0008_sign_in_throttle"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "signinfailure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("failed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("signinfailure", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_signinfailure_key"), ["key"], unique=False)
        batch_op.create_index(batch_op.f("ix_signinfailure_failed_at"), ["failed_at"], unique=False)


def downgrade() -> None:
    op.drop_table("signinfailure")
