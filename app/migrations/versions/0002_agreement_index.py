"""An index for the agreement figures: the overread cases of a version, read from the index
alone (with a million cases, /monitor took 0.6 s for them without it).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_cases_version_overread", "cases", ["model_version", "overread", "decision"])


def downgrade() -> None:
    op.drop_index("ix_cases_version_overread", "cases")
