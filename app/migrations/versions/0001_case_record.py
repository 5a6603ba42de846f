"""The case record: cases and their overreads.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.String(32), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("file_kind", sa.String(8), nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("decision", sa.String(16)),
        sa.Column("refusal", sa.String(64)),
        sa.Column("gate_score", sa.Float),
        sa.Column("features", sa.LargeBinary),
        sa.Column("age_years", sa.Float),
        sa.Column("user", sa.String(128)),
        sa.Column("overread", sa.String(16)),
    )
    op.create_index("ix_cases_version_created", "cases", ["model_version", "created_at"])
    op.create_index("ix_cases_created", "cases", ["created_at"])
    op.create_index("ix_cases_probability", "cases", ["probability"])
    op.create_index("ix_cases_overread_created", "cases", ["overread", "created_at"])
    op.create_table(
        "overreads",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_pk", sa.Integer, sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("read", sa.String(16), nullable=False),
        sa.Column("note", sa.String(500)),
        sa.Column("user", sa.String(128)),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_overreads_case_pk", "overreads", ["case_pk"])


def downgrade() -> None:
    op.drop_table("overreads")
    op.drop_table("cases")
