"""The ledger's schema: the tables, their statuses, and the types they are stored with.

Every table the node keeps (studies, instances, results, the result outbox, study references,
feedback, Segmentation labels, notifications and the notification state, analysis starts) is
declared here, with SQLAlchemy 2.0's typed mappings; the queries live in the aggregate modules.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from config.errors import PleuraError

ERROR_TEXT_LIMIT = 2000
"""The longest error or reason text a row keeps."""


class LedgerError(PleuraError, RuntimeError):
    """The ledger cannot be opened, or was asked something inconsistent with what it holds."""


class StudyStatus(StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    DONE = "done"
    NOT_ANALYSED = "not_analysed"
    FAILED = "failed"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"


class AnalysisStatus(StrEnum):
    """Per instance: waiting for dispatch, sent to a worker, or the worker's answer; or skipped,
    an object Pleura does not analyse (a report, a presentation state, another modality's image),
    recorded when received and never sent to a worker."""

    PENDING = "pending"
    QUEUED = "queued"
    ANALYSED = "analysed"
    NOT_ANALYSED = "not_analysed"
    FAILED = "failed"
    SKIPPED = "skipped"


class Held(StrEnum):
    """What the ledger already holds under a SOP Instance UID that arrives."""

    INSTANCE = "instance"  # received before
    RESULT = "result"  # one of Pleura's own results


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # given up after max_attempts (or at once, for a permanent DICOM refusal)
    REJECTED = "rejected"  # notifications: the receiver refused the message for good (HL7 AR)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite keeps no zone), always returned timezone-aware in UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    task_id: Mapped[str | None] = mapped_column(String(64))
    analysed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    flagged: Mapped[bool | None] = mapped_column(Boolean)
    probability: Mapped[float | None] = mapped_column(Float)
    # CT: the volume (mL) of the pleural air in the study's CT series, the largest of them.
    volume_ml: Mapped[float | None] = mapped_column(Float)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    synthetic_model: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    # Set by a re-analysis request (`pleura reanalyse`, a promotion), cleared by the summary that
    # answers it: that summary's results are delivered again even where they were sent before.
    reanalysis_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A sender marked an instance of it urgent (Priority HIGH, a STAT calling AE): its analysis
    # goes to the STAT queue, which workers serve first (node/dispatch.py).
    urgent: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    # The association that carried it (:class:`Association`); None for instances recorded before
    # associations were tracked: their study settles on quiet time alone.
    association_id: Mapped[str | None] = mapped_column(String(36), index=True)
    analysis_status: Mapped[str] = mapped_column(String(16), default=AnalysisStatus.PENDING.value, index=True)
    analysis_reason: Mapped[str | None] = mapped_column(Text)
    probability: Mapped[float | None] = mapped_column(Float)
    flagged: Mapped[bool | None] = mapped_column(Boolean)
    area_px: Mapped[int | None] = mapped_column(Integer)
    area_cm2: Mapped[float | None] = mapped_column(Float)
    side: Mapped[str | None] = mapped_column(String(16))
    gap_mm: Mapped[float | None] = mapped_column(Float)
    hemithorax_fraction: Mapped[float | None] = mapped_column(Float)


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    source_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OutboxEntry(Base):
    """One result to one destination."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("result_id", "destination", name="uq_outbox_result_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))  # Destination.label: AE@host:port
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # What the destination said of a delivery that succeeded all the same (a warning status).
    response: Mapped[str | None] = mapped_column(Text)


# The worklist (node/api): opaque study references for URLs, radiologists' feedback, and the
# notification outbox (HL7 v2 over MLLP, webhooks) with the flag state last announced per study.


class FeedbackVerdict(StrEnum):
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    KNOWN = "known"  # already known or treated
    CORRECTED = "corrected"  # a pneumothorax, with the radiologist's own outline (mask_key)
    UNDONE = "undone"  # the verdict before was taken back within the undo window; none is in force


UNDO_SECONDS = 60
"""How long after giving a verdict its author may take it back (:meth:`FeedbackLedger.undo_feedback`)."""


class StudyRef(Base):
    """A study's opaque reference, used in URLs instead of its UID."""

    __tablename__ = "study_refs"

    ref: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), unique=True)


class Feedback(Base):
    """A radiologist's verdict on a study's flag; the newest row per study is the one in force."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    verdict: Mapped[str] = mapped_column(String(16))
    user: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # A corrected outline: the image it was drawn on, and the mask (PNG) in the storage dir.
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    mask_key: Mapped[str | None] = mapped_column(String(255))
    # What the model said when the verdict was given.
    flagged: Mapped[bool | None] = mapped_column(Boolean)
    probability: Mapped[float | None] = mapped_column(Float)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))


class SegLabel(Base):
    """What a Segmentation sent back to Pleura says about one image it references: a pneumothorax
    outlined (positive) or an empty outline (negative); the SEG is stored at storage_key."""

    __tablename__ = "seg_labels"
    __table_args__ = (UniqueConstraint("seg_sop_instance_uid", "sop_instance_uid", name="uq_seg_label_image"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seg_sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    seg_study_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)  # the image labelled
    storage_key: Mapped[str] = mapped_column(String(255))
    positive: Mapped[bool] = mapped_column(Boolean)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class Notification(Base):
    """One message (a study flagged, or its flag withdrawn) to one HL7 or webhook target."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    channel: Mapped[str] = mapped_column(String(8))
    target: Mapped[str] = mapped_column(String(300))
    payload: Mapped[str] = mapped_column(Text)  # exactly what is sent, every attempt
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=10)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Association(Base):
    """A DICOM association that stored at least one instance, and how it ended: a study whose
    pending instances all came over associations released normally is due after a short grace
    instead of the whole quiet time (node/ledger/studies.py ``due_studies``). An aborted one (or a
    dropped connection) ends without ``released_at``: its studies wait for the quiet time."""

    __tablename__ = "associations"

    association_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    aborted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AnalysisStart(Base):
    """When a worker last took a study (the worklist's "analysing"), and the lease it holds on it.

    ``heartbeat_at`` is the node's clock when the last sign of life of a running analysis arrived
    (its start or a heartbeat); an analysis whose heartbeats stop for the lease is taken back
    (node/ledger/leases.py). ``lapses`` counts the leases of the study lost since its last recorded
    analysis: a study that keeps killing its worker is reported as not analysed."""

    __tablename__ = "analysis_starts"

    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), primary_key=True)
    task_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lapses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class NotificationState(Base):
    """The flag last announced for a study, and the analysis and feedback it was decided from."""

    __tablename__ = "notification_state"

    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), primary_key=True)
    flagged: Mapped[bool] = mapped_column(Boolean)
    analysed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    feedback_id: Mapped[int] = mapped_column(Integer, default=0)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LoginSession(Base):
    """A worklist log-in (node/api/auth.py): the SHA-256 of its cookie, so that reading the ledger
    gives no one a session; whose it is, and when it ends. Shared by every process serving the API."""

    __tablename__ = "login_sessions"

    session_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class AnalysisRecord(Base):
    """One analysis of a study (the first, and each re-analysis): what the worklist's history
    shows. The study row holds the newest."""

    __tablename__ = "analyses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    analysed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    flagged: Mapped[bool | None] = mapped_column(Boolean)
    probability: Mapped[float | None] = mapped_column(Float)
    reanalysis: Mapped[bool] = mapped_column(Boolean, default=False)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
