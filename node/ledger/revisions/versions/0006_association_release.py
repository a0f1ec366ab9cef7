"""Association release: which association carried each instance and how it ended, so a study
whose sender released its association normally is analysed after a short grace rather than the
whole quiet time; and whether a sender marked a study urgent (the STAT queue).

Revision ID: 0006_association_release
Revises: 0005_dicomweb
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_association_release"
down_revision = "0005_dicomweb"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("association_id", sa.String(length=36), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("opened_at", sa.DateTime(), nullable=False),
        sa.Column("released_at", sa.DateTime(), nullable=True),
        sa.Column("aborted_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("association_id"),
    )
    op.add_column("instances", sa.Column("association_id", sa.String(length=36), nullable=True))
    op.create_index("ix_instances_association_id", "instances", ["association_id"])
    op.add_column("studies", sa.Column("urgent", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    # In place on both databases (SQLite 3.35+), as in 0003.
    op.execute("ALTER TABLE studies DROP COLUMN urgent")
    op.drop_index("ix_instances_association_id", table_name="instances")
    op.execute("ALTER TABLE instances DROP COLUMN association_id")
    op.drop_table("associations")
