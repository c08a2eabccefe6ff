"""raw bytes apart from the ledger's status row; indexes for every per-message lookup

The ledger table becomes `inbound_ledger` without the `raw` column; the bytes move to
`inbound_raw` (one row per ledger row, written once). `inbound_messages` becomes a read-only
view with the columns the table had, so tools that read it keep working. Lookups of the
per-message path get indexes that fit them: Message-ID and dedupe key with the status they filter
on, due retries by status and time, open tickets per assignee.

A later migration that rebuilds `inbound_ledger` or `inbound_raw` on SQLite (batch mode) or
changes a column the view shows must drop the view first and create it again afterwards.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-09
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The columns of the former table, in its order; the view shows exactly these.
VIEW_COLUMNS = (
    "id",
    "received_at",
    "source",
    "raw",
    "size",
    "sha256",
    "message_id",
    "dedupe_key",
    "mail_from",
    "rcpt_to",
    "peer",
    "envelope",
    "status",
    "fail_stage",
    "error",
    "attempts",
    "processed_at",
    "drop_reason",
    "defects",
    "ticket_id",
    "duplicate_of_id",
    "next_attempt_at",
    "discard_reason",
    "lease_owner",
    "lease_until",
    "interruptions",
    "rule_hits",
    "rule_misses",
)
# A LEFT JOIN on the raw table's primary key: a query that does not read `raw` from the view
# is planned without the join (SQLite and PostgreSQL both remove it).
CREATE_VIEW = (
    "CREATE VIEW inbound_messages AS SELECT "
    + ", ".join(f"{'r' if c == 'raw' else 'l'}.{c} AS {c}" for c in VIEW_COLUMNS)
    + " FROM inbound_ledger AS l"
    + " LEFT OUTER JOIN inbound_raw AS r ON r.inbound_message_id = l.id"
)

# The ledger's indexes (name: columns) before and after.
OLD_INDEXES = {
    "ix_inbound_messages_dedupe_key": ["dedupe_key"],
    "ix_inbound_messages_message_id": ["message_id"],
    "ix_inbound_messages_received_at": ["received_at"],
    "ix_inbound_messages_sha256": ["sha256"],
    "ix_inbound_messages_status_id": ["status", "id"],
    "ix_inbound_messages_ticket_id": ["ticket_id"],
}
NEW_INDEXES = {
    "ix_inbound_ledger_message_id_status": ["message_id", "status"],
    "ix_inbound_ledger_dedupe_key_status": ["dedupe_key", "status"],
    "ix_inbound_ledger_duplicate_of_id": ["duplicate_of_id"],
    "ix_inbound_ledger_received_at": ["received_at"],
    "ix_inbound_ledger_sha256": ["sha256"],
    "ix_inbound_ledger_status_id": ["status", "id"],
    "ix_inbound_ledger_status_next_attempt_at": ["status", "next_attempt_at"],
    "ix_inbound_ledger_ticket_id": ["ticket_id"],
}
# PostgreSQL names the table's own sequence and constraints after it: renamed with it.
PG_NAMES = (
    ("SEQUENCE", "inbound_messages_id_seq", "inbound_ledger_id_seq"),
    ("INDEX", "inbound_messages_pkey", "inbound_ledger_pkey"),
    ("CONSTRAINT", "inbound_messages_ticket_id_fkey", "inbound_ledger_ticket_id_fkey"),
    ("CONSTRAINT", "inbound_messages_duplicate_of_id_fkey", "inbound_ledger_duplicate_of_id_fkey"),
)


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _rename_pg_names(table: str, *, forward: bool) -> None:
    for kind, old, new in PG_NAMES:
        before, after = (old, new) if forward else (new, old)
        if kind == "CONSTRAINT":
            op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {before} TO {after}")
        else:
            op.execute(f"ALTER {kind} {before} RENAME TO {after}")


def upgrade() -> None:
    # Old indexes first: the copies below then write no index entries for them.
    for name in OLD_INDEXES:
        op.drop_index(name, table_name="inbound_messages")
    op.drop_index("ix_tickets_assignee", table_name="tickets")

    # Foreign keys of tickets, comments, attachments and attempts follow the renamed table
    # (PostgreSQL by identity, SQLite >= 3.26 rewrites them).
    op.rename_table("inbound_messages", "inbound_ledger")
    if _postgresql():
        _rename_pg_names("inbound_ledger", forward=True)

    op.create_table(
        "inbound_raw",
        sa.Column("inbound_message_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["inbound_message_id"], ["inbound_ledger.id"]),
        sa.PrimaryKeyConstraint("inbound_message_id"),
    )
    op.execute(
        "INSERT INTO inbound_raw (inbound_message_id, raw) SELECT id, raw FROM inbound_ledger"
    )
    with op.batch_alter_table("inbound_ledger") as batch:
        batch.drop_column("raw")

    for name, columns in NEW_INDEXES.items():
        op.create_index(name, "inbound_ledger", columns, unique=False)
    op.create_index("ix_tickets_assignee_status", "tickets", ["assignee", "status"], unique=False)
    op.execute(CREATE_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW inbound_messages")
    for name in NEW_INDEXES:
        op.drop_index(name, table_name="inbound_ledger")
    op.drop_index("ix_tickets_assignee_status", table_name="tickets")
    op.create_index("ix_tickets_assignee", "tickets", ["assignee"], unique=False)

    raw = sa.Column("raw", sa.LargeBinary(), nullable=True)
    if _postgresql():
        op.add_column("inbound_ledger", raw)
    else:  # SQLite: rebuilt, so that `raw` gets its old place after `source`
        with op.batch_alter_table("inbound_ledger", recreate="always") as batch:
            batch.add_column(raw, insert_after="source")
    op.execute(
        "UPDATE inbound_ledger SET raw = (SELECT r.raw FROM inbound_raw AS r"
        " WHERE r.inbound_message_id = inbound_ledger.id)"
    )
    empty = "'\\x'::bytea" if _postgresql() else "X''"
    op.execute(f"UPDATE inbound_ledger SET raw = {empty} WHERE raw IS NULL")
    with op.batch_alter_table("inbound_ledger") as batch:
        batch.alter_column("raw", existing_type=sa.LargeBinary(), nullable=False)
    op.drop_table("inbound_raw")

    if _postgresql():
        _rename_pg_names("inbound_ledger", forward=False)
    op.rename_table("inbound_ledger", "inbound_messages")
    for name, columns in OLD_INDEXES.items():
        op.create_index(name, "inbound_messages", columns, unique=False)
