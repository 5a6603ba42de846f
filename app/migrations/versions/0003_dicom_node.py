"""The DICOM node: a case's link to its study, and the outbox of structured reports.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as table:  # batch: SQLite adds a unique column by copying the table
        table.add_column(sa.Column("study_uid", sa.String(64)))
        table.add_column(sa.Column("series_uid", sa.String(64)))
        table.add_column(sa.Column("sop_uid", sa.String(64)))
        table.create_unique_constraint("uq_cases_sop_uid", ["sop_uid"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_pk", sa.Integer, sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("sr_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.String(200)),
    )
    op.create_index("ix_deliveries_case_pk", "deliveries", ["case_pk"])
    op.create_index("ix_deliveries_state_next", "deliveries", ["state", "next_at"])


def downgrade() -> None:
    op.drop_table("deliveries")
    with op.batch_alter_table("cases") as table:
        table.drop_constraint("uq_cases_sop_uid", type_="unique")
        table.drop_column("sop_uid")
        table.drop_column("series_uid")
        table.drop_column("study_uid")
