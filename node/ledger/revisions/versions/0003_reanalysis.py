"""Re-analysis: a study's request to be analysed again (`pleura reanalyse`, or a promotion with
`reanalyse_hours_on_promote`), and the history of its analyses that the worklist shows
(node/reanalyse.py, node/ledger/reanalysis.py).

Revision ID: 0003_reanalysis
Revises: 0002_login_sessions
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_reanalysis"
down_revision = "0002_login_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("reanalysis_requested_at", sa.DateTime(), nullable=True))
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("analysed_at", sa.DateTime(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=True),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("reanalysis", sa.Boolean(), nullable=False),
        sa.Column("sr_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["study_uid"], ["studies.study_uid"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_analyses_study_uid"), "analyses", ["study_uid"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_analyses_study_uid"), table_name="analyses")
    op.drop_table("analyses")
    # In place on both databases (SQLite 3.35+): batch mode would copy and drop `studies`, which
    # the other tables' foreign keys forbid while they are enforced.
    op.execute("ALTER TABLE studies DROP COLUMN reanalysis_requested_at")
