"""merge the security and evaluation branches: sign-in throttle, owners and ids, evaluations

Revision ID: 0010_merge_round3
Revises: 0008_sign_in_throttle, 0009_owners_and_ids, 0013_evaluations
Create Date: 2026-12-02 20:35:00
"""

from collections.abc import Sequence

revision: str = "0010_merge_round3"
down_revision: str | Sequence[str] | None = (
    "0008_sign_in_throttle",
    "0009_owners_and_ids",
    "0013_evaluations",
)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing to change: this revision joins the three branches that grew off 0007 into one head."""


def downgrade() -> None:
    """Nothing to change."""
