"""IMAP folder leases: one node fetches an account's folder at a time

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "imap_leases",
        sa.Column("account", sa.String(length=128), primary_key=True),
        sa.Column("folder", sa.String(length=255), primary_key=True),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("imap_leases")
