"""metric roll-ups: per-block summaries of a job's metric points written beside them; metric indexes

- ``metricrollup``: one row per block of 16, 64 or 256 consecutive points of a job (app/core/rollups.py), found by
  ``(job_id, size, last_id)``.
- ``metricpoint (job_id, step)``: a resume deletes the points after its checkpoint's step; without it that
  delete scans every point of the job (Postgres does not index foreign keys by itself; the stream's, series'
  and metrics' reads use the existing ``(job_id, id)``).

Revision ID: 0015_metric_rollups
Revises: 0014_model_downloads
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_metric_rollups"
down_revision: str | Sequence[str] | None = "0014_model_downloads"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "metricrollup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("prev_id", sa.Integer(), nullable=True),
        sa.Column("first_id", sa.Integer(), nullable=False),
        sa.Column("last_id", sa.Integer(), nullable=False),
        sa.Column("points", sa.Integer(), nullable=False),
        sa.Column("series", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("metricrollup", schema=None) as batch_op:
        batch_op.create_index(
            "ix_metricrollup_job_id_size_last_id", ["job_id", "size", "last_id"], unique=False
        )
    with op.batch_alter_table("metricpoint", schema=None) as batch_op:
        batch_op.create_index("ix_metricpoint_job_id_step", ["job_id", "step"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("metricpoint", schema=None) as batch_op:
        batch_op.drop_index("ix_metricpoint_job_id_step")
    with op.batch_alter_table("metricrollup", schema=None) as batch_op:
        batch_op.drop_index("ix_metricrollup_job_id_size_last_id")
    op.drop_table("metricrollup")
