"""stage timings: how long each stage took, stored with the fate on the ledger row

One nullable JSON column on `inbound_ledger`; rows processed before stay NULL. The
`inbound_messages` view keeps the columns it had (tools reading it see no change), so it is
neither dropped nor recreated: adding a nullable column rebuilds nothing, on SQLite either.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("inbound_ledger", sa.Column("stage_timings", sa.JSON(), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_column("inbound_ledger", "stage_timings")
        return
    # SQLite drops a column by rebuilding the table, which the view refers to (see 0005):
    # the view goes first and comes back, as 0005 made it, afterwards.
    view = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT sql FROM sqlite_master WHERE type = 'view' AND name = 'inbound_messages'"
            )
        )
        .scalar_one()
    )
    op.execute("DROP VIEW inbound_messages")
    with op.batch_alter_table("inbound_ledger") as batch:
        batch.drop_column("stage_timings")
    op.execute(view)
