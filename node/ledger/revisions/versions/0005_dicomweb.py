"""DICOMweb destinations: what the destination answered to a delivery that succeeded (a STOW-RS
or C-STORE warning), kept beside the outbox row's last error (node/export.py).

Revision ID: 0005_dicomweb
Revises: 0004_analysis_leases
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_dicomweb"
down_revision = "0004_analysis_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("response", sa.Text(), nullable=True))


def downgrade() -> None:
    # In place on both databases (SQLite 3.35+), as in 0003.
    op.execute("ALTER TABLE outbox DROP COLUMN response")
