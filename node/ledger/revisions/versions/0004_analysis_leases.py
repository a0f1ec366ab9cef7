"""Analysis leases: the node's clock at a running analysis's last heartbeat, and how many leases
of the study lapsed (a worker killed mid-task), so a killed worker's study is analysed again in
seconds and a study that keeps killing its worker is reported as not analysed
(node/ledger/leases.py).

Revision ID: 0004_analysis_leases
Revises: 0003_reanalysis
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_analysis_leases"
down_revision = "0003_reanalysis"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("analysis_starts", sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
    op.add_column("analysis_starts", sa.Column("lapses", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    # In place on both databases (SQLite 3.35+), as in 0003.
    op.execute("ALTER TABLE analysis_starts DROP COLUMN lapses")
    op.execute("ALTER TABLE analysis_starts DROP COLUMN heartbeat_at")
