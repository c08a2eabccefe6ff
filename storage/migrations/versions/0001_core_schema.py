"""core schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "assignment_cursors",
        sa.Column("team", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("team"),
    )
    op.create_table(
        "attachment_blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    op.create_table(
        "imap_checkpoints",
        sa.Column("account", sa.String(length=128), nullable=False),
        sa.Column("folder", sa.String(length=255), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account", "folder"),
    )
    op.create_table(
        "tickets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("body_html", sa.Text(), nullable=True),
        sa.Column("requester_name", sa.String(length=255), nullable=True),
        sa.Column("requester_email", sa.String(length=320), nullable=True),
        sa.Column("requester_phone", sa.String(length=64), nullable=True),
        sa.Column("requester_company", sa.String(length=255), nullable=True),
        sa.Column("assignee", sa.String(length=64), nullable=True),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("fields", sa.JSON(), nullable=False),
        sa.Column("rule_names", sa.JSON(), nullable=False),
        sa.Column("rules_version", sa.String(length=64), nullable=True),
        sa.Column("inbound_message_id", sa.Integer(), nullable=False),
        sa.Column("origin_key", sa.String(length=998), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("inbound_message_id"),
        sa.UniqueConstraint("key"),
        sa.UniqueConstraint("origin_key"),
    )
    op.create_index(op.f("ix_tickets_assignee"), "tickets", ["assignee"], unique=False)
    op.create_index(op.f("ix_tickets_category"), "tickets", ["category"], unique=False)
    op.create_index(op.f("ix_tickets_created_at"), "tickets", ["created_at"], unique=False)
    op.create_index(
        op.f("ix_tickets_requester_email"), "tickets", ["requester_email"], unique=False
    )
    op.create_index(op.f("ix_tickets_status"), "tickets", ["status"], unique=False)
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=998), nullable=True),
        sa.Column("dedupe_key", sa.String(length=998), nullable=False),
        sa.Column("mail_from", sa.String(length=998), nullable=True),
        sa.Column("rcpt_to", sa.JSON(), nullable=False),
        sa.Column("peer", sa.String(length=255), nullable=True),
        sa.Column("envelope", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("fail_stage", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("drop_reason", sa.Text(), nullable=True),
        sa.Column("defects", sa.JSON(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=True),
        sa.Column("duplicate_of_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["duplicate_of_id"],
            ["inbound_messages.id"],
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"],
            ["tickets.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_inbound_messages_dedupe_key"), "inbound_messages", ["dedupe_key"], unique=False
    )
    op.create_index(
        op.f("ix_inbound_messages_message_id"), "inbound_messages", ["message_id"], unique=False
    )
    op.create_index(
        op.f("ix_inbound_messages_received_at"), "inbound_messages", ["received_at"], unique=False
    )
    op.create_index(
        op.f("ix_inbound_messages_sha256"), "inbound_messages", ["sha256"], unique=False
    )
    op.create_index(
        "ix_inbound_messages_status_id", "inbound_messages", ["status", "id"], unique=False
    )
    op.create_index(
        op.f("ix_inbound_messages_ticket_id"), "inbound_messages", ["ticket_id"], unique=False
    )
    # tickets and inbound_messages reference each other: the second link is added afterwards.
    with op.batch_alter_table("tickets") as batch:
        batch.create_foreign_key(
            "fk_tickets_inbound_message_id", "inbound_messages", ["inbound_message_id"], ["id"]
        )
    op.create_table(
        "ticket_comments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("author_name", sa.String(length=255), nullable=True),
        sa.Column("author_email", sa.String(length=320), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("body_full", sa.Text(), nullable=False),
        sa.Column("inbound_message_id", sa.Integer(), nullable=False),
        sa.Column("origin_key", sa.String(length=998), nullable=False),
        sa.ForeignKeyConstraint(
            ["inbound_message_id"],
            ["inbound_messages.id"],
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"],
            ["tickets.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("inbound_message_id"),
        sa.UniqueConstraint("origin_key"),
    )
    op.create_index(
        op.f("ix_ticket_comments_ticket_id"), "ticket_comments", ["ticket_id"], unique=False
    )
    op.create_table(
        "attachments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("inbound_message_id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=True),
        sa.Column("comment_id", sa.Integer(), nullable=True),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("original_filename", sa.Text(), nullable=True),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("content_id", sa.String(length=998), nullable=True),
        sa.Column("inline", sa.Boolean(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["comment_id"],
            ["ticket_comments.id"],
        ),
        sa.ForeignKeyConstraint(
            ["inbound_message_id"],
            ["inbound_messages.id"],
        ),
        sa.ForeignKeyConstraint(
            ["sha256"],
            ["attachment_blobs.sha256"],
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"],
            ["tickets.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_attachments_comment_id"), "attachments", ["comment_id"], unique=False)
    op.create_index(
        op.f("ix_attachments_inbound_message_id"),
        "attachments",
        ["inbound_message_id"],
        unique=False,
    )
    op.create_index(op.f("ix_attachments_sha256"), "attachments", ["sha256"], unique=False)
    op.create_index(op.f("ix_attachments_ticket_id"), "attachments", ["ticket_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_attachments_ticket_id"), table_name="attachments")
    op.drop_index(op.f("ix_attachments_sha256"), table_name="attachments")
    op.drop_index(op.f("ix_attachments_inbound_message_id"), table_name="attachments")
    op.drop_index(op.f("ix_attachments_comment_id"), table_name="attachments")
    op.drop_table("attachments")
    op.drop_index(op.f("ix_ticket_comments_ticket_id"), table_name="ticket_comments")
    op.drop_table("ticket_comments")
    op.drop_index(op.f("ix_inbound_messages_ticket_id"), table_name="inbound_messages")
    op.drop_index("ix_inbound_messages_status_id", table_name="inbound_messages")
    op.drop_index(op.f("ix_inbound_messages_sha256"), table_name="inbound_messages")
    op.drop_index(op.f("ix_inbound_messages_received_at"), table_name="inbound_messages")
    op.drop_index(op.f("ix_inbound_messages_message_id"), table_name="inbound_messages")
    op.drop_index(op.f("ix_inbound_messages_dedupe_key"), table_name="inbound_messages")
    with op.batch_alter_table("tickets") as batch:
        batch.drop_constraint("fk_tickets_inbound_message_id", type_="foreignkey")
    op.drop_table("inbound_messages")
    op.drop_index(op.f("ix_tickets_status"), table_name="tickets")
    op.drop_index(op.f("ix_tickets_requester_email"), table_name="tickets")
    op.drop_index(op.f("ix_tickets_created_at"), table_name="tickets")
    op.drop_index(op.f("ix_tickets_category"), table_name="tickets")
    op.drop_index(op.f("ix_tickets_assignee"), table_name="tickets")
    op.drop_table("tickets")
    op.drop_table("imap_checkpoints")
    op.drop_table("attachment_blobs")
    op.drop_table("assignment_cursors")
