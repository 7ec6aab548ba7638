"""merge the feature branches: resilience, sweeps, workers, accounts, automation

Revision ID: 0007
Revises: 0002, 0003, 0004, 0005, 0006
Create Date: 2026-11-26 04:45:00
"""

from collections.abc import Sequence

revision: str = "0007"
down_revision: str | Sequence[str] | None = ("0002", "0003", "0004", "0005", "0006")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing to change: this revision joins the five branches that grew off 0001 into one head."""


def downgrade() -> None:
    """Nothing to change."""
