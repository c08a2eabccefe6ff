"""failed messages: processing history, discard, automatic retry schedule

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("inbound_messages") as batch:
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("discard_reason", sa.Text(), nullable=True))
    op.create_table(
        "processing_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("inbound_message_id", sa.Integer(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=True),
        sa.Column("command", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["inbound_message_id"], ["inbound_messages.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_processing_attempts_inbound_message_id"),
        "processing_attempts",
        ["inbound_message_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_processing_attempts_inbound_message_id"), table_name="processing_attempts"
    )
    op.drop_table("processing_attempts")
    # Discarded messages become plain failures again; their reason is lost with the column.
    op.execute("UPDATE inbound_messages SET status = 'failed' WHERE status = 'discarded'")
    with op.batch_alter_table("inbound_messages") as batch:
        batch.drop_column("discard_reason")
        batch.drop_column("next_attempt_at")
