"""triage assistant: trained models, a suggestion per ticket, a one-line summary on tickets

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "triage_models",
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trained_on", sa.Integer(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("model", sa.LargeBinary(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_table(
        "ticket_suggestions",
        sa.Column("ticket_id", sa.Integer(), sa.ForeignKey("tickets.id"), primary_key=True),
        sa.Column("category", sa.String(64), nullable=False),
        sa.Column("category_probability", sa.Float(), nullable=False),
        sa.Column("assignee", sa.String(64), nullable=True),
        sa.Column("assignee_probability", sa.Float(), nullable=False),
        sa.Column(
            "model_version",
            sa.Integer(),
            sa.ForeignKey("triage_models.version"),
            nullable=False,
        ),
        sa.Column("reason", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # Adding a nullable column needs no table rebuild, on SQLite either (no batch mode).
    op.add_column("tickets", sa.Column("summary", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("summary")
    op.drop_table("ticket_suggestions")
    op.drop_table("triage_models")
