"""The CT volume of a study: the volume (mL) of pleural air its CT series' analysis measured, which
the worklist shows (node/ledger/results.py).

Revision ID: 0007_ct_volume
Revises: 0006_association_release
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_ct_volume"
down_revision = "0006_association_release"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("volume_ml", sa.Float(), nullable=True))


def downgrade() -> None:
    # In place on both databases (SQLite 3.35+), as in 0003.
    op.execute("ALTER TABLE studies DROP COLUMN volume_ml")
