"""model downloads: Hub models fetched into the shared cache with their progress; users' Hub tokens

Revision ID: 0014_model_downloads
Revises: 0010_merge_round3
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0014_model_downloads"
down_revision: str | Sequence[str] | None = "0010_merge_round3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_download",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("model_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("revision", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("commit_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("done_bytes", sa.BigInteger(), nullable=False),
        sa.Column("total_files", sa.Integer(), nullable=False),
        sa.Column("done_files", sa.Integer(), nullable=False),
        sa.Column("bytes_per_second", sa.Float(), nullable=False),
        sa.Column("eta_seconds", sa.Float(), nullable=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("worker", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,  # ids are public (URLs): never reused, as for the other tables
    )
    with op.batch_alter_table("model_download", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_download_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_download_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_download_status"), ["status"], unique=False)
    op.create_table(
        "hub_token",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("encrypted", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id"),
    )


def downgrade() -> None:
    op.drop_table("hub_token")
    op.drop_table("model_download")
