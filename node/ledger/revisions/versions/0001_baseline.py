"""Baseline: the ledger as the last release without migrations left it.

Studies, instances, results and their outbox, study references, feedback, Segmentation labels,
notifications and their state, analysis starts. A ledger from before migrations whose tables are
these is stamped at this revision by `pleura db upgrade` (node/ledger/migrations.py), never created
by it again. Frozen: a change to the schema is a new revision, never an edit here.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('seg_labels',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('seg_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('seg_study_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('storage_key', sa.String(length=255), nullable=False),
    sa.Column('positive', sa.Boolean(), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('seg_sop_instance_uid', 'sop_instance_uid', name='uq_seg_label_image')
    )
    op.create_index(op.f('ix_seg_labels_received_at'), 'seg_labels', ['received_at'], unique=False)
    op.create_index(op.f('ix_seg_labels_seg_sop_instance_uid'), 'seg_labels', ['seg_sop_instance_uid'], unique=False)
    op.create_index(op.f('ix_seg_labels_sop_instance_uid'), 'seg_labels', ['sop_instance_uid'], unique=False)
    op.create_table('studies',
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('accession_number', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('first_received_at', sa.DateTime(), nullable=False),
    sa.Column('last_received_at', sa.DateTime(), nullable=False),
    sa.Column('queued_at', sa.DateTime(), nullable=True),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('analysed_at', sa.DateTime(), nullable=True),
    sa.Column('delivered_at', sa.DateTime(), nullable=True),
    sa.Column('flagged', sa.Boolean(), nullable=True),
    sa.Column('probability', sa.Float(), nullable=True),
    sa.Column('model_name', sa.String(length=128), nullable=True),
    sa.Column('model_version', sa.String(length=64), nullable=True),
    sa.Column('synthetic_model', sa.Boolean(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('study_uid')
    )
    op.create_index(op.f('ix_studies_last_received_at'), 'studies', ['last_received_at'], unique=False)
    op.create_index(op.f('ix_studies_status'), 'studies', ['status'], unique=False)
    op.create_table('analysis_starts',
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
    sa.PrimaryKeyConstraint('study_uid')
    )
    op.create_table('feedback',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('verdict', sa.String(length=16), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('mask_key', sa.String(length=255), nullable=True),
    sa.Column('flagged', sa.Boolean(), nullable=True),
    sa.Column('probability', sa.Float(), nullable=True),
    sa.Column('model_name', sa.String(length=128), nullable=True),
    sa.Column('model_version', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_feedback_created_at'), 'feedback', ['created_at'], unique=False)
    op.create_index(op.f('ix_feedback_study_uid'), 'feedback', ['study_uid'], unique=False)
    op.create_table('instances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('storage_key', sa.String(length=255), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.Column('analysis_status', sa.String(length=16), nullable=False),
    sa.Column('analysis_reason', sa.Text(), nullable=True),
    sa.Column('probability', sa.Float(), nullable=True),
    sa.Column('flagged', sa.Boolean(), nullable=True),
    sa.Column('area_px', sa.Integer(), nullable=True),
    sa.Column('area_cm2', sa.Float(), nullable=True),
    sa.Column('side', sa.String(length=16), nullable=True),
    sa.Column('gap_mm', sa.Float(), nullable=True),
    sa.Column('hemithorax_fraction', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    op.create_index(op.f('ix_instances_analysis_status'), 'instances', ['analysis_status'], unique=False)
    op.create_index(op.f('ix_instances_study_uid'), 'instances', ['study_uid'], unique=False)
    op.create_table('notification_state',
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('flagged', sa.Boolean(), nullable=False),
    sa.Column('analysed_at', sa.DateTime(), nullable=True),
    sa.Column('feedback_id', sa.Integer(), nullable=False),
    sa.Column('checked_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
    sa.PrimaryKeyConstraint('study_uid')
    )
    op.create_table('notifications',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('event', sa.String(length=16), nullable=False),
    sa.Column('channel', sa.String(length=8), nullable=False),
    sa.Column('target', sa.String(length=300), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('last_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('response', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_notifications_next_attempt_at'), 'notifications', ['next_attempt_at'], unique=False)
    op.create_index(op.f('ix_notifications_status'), 'notifications', ['status'], unique=False)
    op.create_index(op.f('ix_notifications_study_uid'), 'notifications', ['study_uid'], unique=False)
    op.create_table('results',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('storage_key', sa.String(length=255), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('source_sop_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    op.create_index(op.f('ix_results_study_uid'), 'results', ['study_uid'], unique=False)
    op.create_table('study_refs',
    sa.Column('ref', sa.String(length=32), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
    sa.PrimaryKeyConstraint('ref'),
    sa.UniqueConstraint('study_uid')
    )
    op.create_table('outbox',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=300), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('last_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['result_id'], ['results.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('result_id', 'destination', name='uq_outbox_result_destination')
    )
    op.create_index(op.f('ix_outbox_next_attempt_at'), 'outbox', ['next_attempt_at'], unique=False)
    op.create_index(op.f('ix_outbox_result_id'), 'outbox', ['result_id'], unique=False)
    op.create_index(op.f('ix_outbox_status'), 'outbox', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_outbox_status'), table_name='outbox')
    op.drop_index(op.f('ix_outbox_result_id'), table_name='outbox')
    op.drop_index(op.f('ix_outbox_next_attempt_at'), table_name='outbox')
    op.drop_table('outbox')
    op.drop_table('study_refs')
    op.drop_index(op.f('ix_results_study_uid'), table_name='results')
    op.drop_table('results')
    op.drop_index(op.f('ix_notifications_study_uid'), table_name='notifications')
    op.drop_index(op.f('ix_notifications_status'), table_name='notifications')
    op.drop_index(op.f('ix_notifications_next_attempt_at'), table_name='notifications')
    op.drop_table('notifications')
    op.drop_table('notification_state')
    op.drop_index(op.f('ix_instances_study_uid'), table_name='instances')
    op.drop_index(op.f('ix_instances_analysis_status'), table_name='instances')
    op.drop_table('instances')
    op.drop_index(op.f('ix_feedback_study_uid'), table_name='feedback')
    op.drop_index(op.f('ix_feedback_created_at'), table_name='feedback')
    op.drop_table('feedback')
    op.drop_table('analysis_starts')
    op.drop_index(op.f('ix_studies_status'), table_name='studies')
    op.drop_index(op.f('ix_studies_last_received_at'), table_name='studies')
    op.drop_table('studies')
    op.drop_index(op.f('ix_seg_labels_sop_instance_uid'), table_name='seg_labels')
    op.drop_index(op.f('ix_seg_labels_seg_sop_instance_uid'), table_name='seg_labels')
    op.drop_index(op.f('ix_seg_labels_received_at'), table_name='seg_labels')
    op.drop_table('seg_labels')
