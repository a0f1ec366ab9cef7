"""The ledger: where every received instance, study, result and delivery stands, and why.

SQLAlchemy 2.0 models and one :class:`Ledger` class that owns every query, so the rules (a re-sent
instance creates no work, a new instance reopens an analysed study, a study is delivered when every
result reached every destination) live in one place. SQLite is the default and is shared by several
processes (the SCP, the export worker): it runs in WAL mode with a busy timeout, and every
transaction that may write takes the write lock up front so that two writers never deadlock on a
lock upgrade; read-only transactions (:meth:`Ledger.reading`) take none and read a snapshot, so the
worklist, the API and the dispatcher's polling never wait for the SCP's writes, nor hold them up.
PostgreSQL works with the same code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    case,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from node.privacy import ref
from node.private_files import make_private

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY = "pleura_read_only"
"""Execution option of the connections of :meth:`Ledger.reading` (a plain BEGIN on SQLite)."""
_ERROR_TEXT_LIMIT = 2000


class LedgerError(RuntimeError):
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
    FAILED = "failed"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite keeps no zone), always returned timezone-aware in UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else _as_utc(value).replace(tzinfo=None)

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
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    synthetic_model: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)


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


# The worklist (node/api): opaque study references for URLs, radiologists' feedback, and the
# notification outbox (HL7 v2 over MLLP, webhooks) with the flag state last announced per study.


class FeedbackVerdict(StrEnum):
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    KNOWN = "known"  # already known or treated
    CORRECTED = "corrected"  # a pneumothorax, with the radiologist's own outline (mask_key)


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


class AnalysisStart(Base):
    """When a worker last took a study (the worklist's "analysing")."""

    __tablename__ = "analysis_starts"

    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), primary_key=True)
    task_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())


class NotificationState(Base):
    """The flag last announced for a study, and the analysis and feedback it was decided from."""

    __tablename__ = "notification_state"

    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), primary_key=True)
    flagged: Mapped[bool] = mapped_column(Boolean)
    analysed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    feedback_id: Mapped[int] = mapped_column(Integer, default=0)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class NotificationView:
    id: int
    study_uid: str
    event: str
    channel: str
    target: str
    payload: str
    status: str
    attempts: int
    max_attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_error: str | None
    response: str | None
    created_at: datetime
    sent_at: datetime | None


def _notification_view(row: Notification) -> NotificationView:
    return NotificationView(
        id=row.id,
        study_uid=row.study_uid,
        event=row.event,
        channel=row.channel,
        target=row.target,
        payload=row.payload,
        status=row.status,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        next_attempt_at=row.next_attempt_at,
        last_attempt_at=row.last_attempt_at,
        last_error=row.last_error,
        response=row.response,
        created_at=row.created_at,
        sent_at=row.sent_at,
    )


def _feedback_dict(row: Feedback) -> dict[str, Any]:
    return {
        "id": row.id,
        "study_uid": row.study_uid,
        "verdict": row.verdict,
        "user": row.user,
        "comment": row.comment,
        "created_at": row.created_at,
        "sop_instance_uid": row.sop_instance_uid,
        "mask_key": row.mask_key,
        "flagged": row.flagged,
        "probability": row.probability,
        "model_name": row.model_name,
        "model_version": row.model_version,
    }


def _flagged_findings(session: Session, study_uids: list[str]) -> dict[str, tuple[str | None, float | None]]:
    """Per study: the side of its flagged images ("bilateral" when they differ) and the largest
    pleural gap, from the per-image side and gap_mm the analysis records (None where it does not)."""
    found: dict[str, tuple[str | None, float | None]] = {}
    if not study_uids:
        return found
    flagged = session.scalars(
        select(Instance).where(Instance.study_uid.in_(study_uids), Instance.flagged.is_(True))
    ).all()
    by_study: dict[str, list[Instance]] = {}
    for row in flagged:
        by_study.setdefault(row.study_uid, []).append(row)
    for study_uid, rows in by_study.items():
        sides = {getattr(row, "side", None) for row in rows} - {None}
        gaps = [getattr(row, "gap_mm", None) for row in rows]
        side = None if not sides else "bilateral" if len(sides) > 1 else next(iter(sides))
        found[study_uid] = (side, max((g for g in gaps if g is not None), default=None))
    return found


def study_ref_for(study_uid: str) -> str:
    """The opaque reference of a study (a hash of its UID): what URLs and logs name instead of the UID."""
    return hashlib.sha256(study_uid.encode("ascii", "replace")).hexdigest()[:20]


def flag_in_force(model_flagged: bool | None, verdict: str | None) -> bool:
    """The flag the worklist and the notifications show: the model's, unless a radiologist rejected
    it; a radiologist's corrected outline flags the study even where the model missed it."""
    if verdict == FeedbackVerdict.CORRECTED:
        return True
    return bool(model_flagged) and verdict != FeedbackVerdict.REJECTED


# Plain snapshots handed out of the ledger, so callers never hold a session.


@dataclass(frozen=True)
class InstanceView:
    sop_instance_uid: str
    study_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    storage_key: str
    received_at: datetime
    calling_ae: str | None
    analysis_status: str
    analysis_reason: str | None
    probability: float | None
    flagged: bool | None
    area_px: int | None
    area_cm2: float | None
    side: str | None = None
    gap_mm: float | None = None
    hemithorax_fraction: float | None = None


@dataclass(frozen=True)
class ResultView:
    sop_instance_uid: str
    kind: str
    sop_class_uid: str
    storage_key: str
    study_uid: str
    source_sop_instance_uid: str | None
    created_at: datetime


@dataclass(frozen=True)
class OutboxView:
    id: int
    study_uid: str
    result_uid: str
    result_kind: str
    result_key: str
    destination: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_error: str | None
    sent_at: datetime | None


@dataclass(frozen=True)
class DueStudy:
    """A settled study and its instances that no worker has been asked about yet."""

    study_uid: str
    instances: list[dict[str, str]] = field(default_factory=list)


def _study_dict(study: Study, instances: int, area_px: int | None, area_cm2: float | None) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "status": study.status,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "first_received_at": study.first_received_at,
        "last_received_at": study.last_received_at,
        "queued_at": study.queued_at,
        "task_id": study.task_id,
        "analysed_at": study.analysed_at,
        "delivered_at": study.delivered_at,
        "flagged": study.flagged,
        "probability": study.probability,
        "area_px": area_px,
        "area_cm2": area_cm2,
        "model_name": study.model_name,
        "model_version": study.model_version,
        "synthetic_model": study.synthetic_model,
        "reason": study.reason,
        "instances": instances,
    }


def _study_aggregates() -> Any:
    """Per study: the instance count and the largest flagged area."""
    flagged = Instance.flagged.is_(True)
    return (
        select(
            Instance.study_uid.label("study_uid"),
            func.count(Instance.id).label("instances"),
            func.max(case((flagged, Instance.area_px))).label("area_px"),
            func.max(case((flagged, Instance.area_cm2))).label("area_cm2"),
        )
        .group_by(Instance.study_uid)
        .subquery()
    )


def _instance_view(row: Instance) -> InstanceView:
    return InstanceView(
        sop_instance_uid=row.sop_instance_uid,
        study_uid=row.study_uid,
        series_instance_uid=row.series_instance_uid,
        sop_class_uid=row.sop_class_uid,
        transfer_syntax_uid=row.transfer_syntax_uid,
        storage_key=row.storage_key,
        received_at=row.received_at,
        calling_ae=row.calling_ae,
        analysis_status=row.analysis_status,
        analysis_reason=row.analysis_reason,
        probability=row.probability,
        flagged=row.flagged,
        area_px=row.area_px,
        area_cm2=row.area_cm2,
        side=row.side,
        gap_mm=row.gap_mm,
        hemithorax_fraction=row.hemithorax_fraction,
    )


def _result_view(row: Result) -> ResultView:
    return ResultView(
        sop_instance_uid=row.sop_instance_uid,
        kind=row.kind,
        sop_class_uid=row.sop_class_uid,
        storage_key=row.storage_key,
        study_uid=row.study_uid,
        source_sop_instance_uid=row.source_sop_instance_uid,
        created_at=row.created_at,
    )


def _outbox_view(entry: OutboxEntry, result: Result) -> OutboxView:
    return OutboxView(
        id=entry.id,
        study_uid=result.study_uid,
        result_uid=result.sop_instance_uid,
        result_kind=result.kind,
        result_key=result.storage_key,
        destination=entry.destination,
        status=entry.status,
        attempts=entry.attempts,
        next_attempt_at=entry.next_attempt_at,
        last_attempt_at=entry.last_attempt_at,
        last_error=entry.last_error,
        sent_at=entry.sent_at,
    )


# The worker's summary, checked before anything is written.

_IMAGE_STATUSES = {AnalysisStatus.ANALYSED.value, AnalysisStatus.NOT_ANALYSED.value, AnalysisStatus.FAILED.value}
_RESULT_KINDS = {"SEG", "SR", "GSPS", "SC"}


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise ValueError(f"analysis summary: {where} must be an object, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"analysis summary: {where} has no '{key}'")
    return mapping[key]


def _parse_time(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return _as_utc(value)
    try:
        return _as_utc(datetime.fromisoformat(str(value)))
    except ValueError:
        raise ValueError(f"analysis summary: {where} {value!r} is not an ISO-8601 time") from None


def _check_summary(summary: dict[str, Any]) -> None:
    _require(summary, "study_uid", "the summary")
    model = _require(summary, "model", "the summary")
    for key in ("name", "version"):
        _require(model, key, "'model'")
    images = _require(summary, "images", "the summary")
    results = _require(summary, "results", "the summary")
    if not isinstance(images, list) or not isinstance(results, list):
        raise ValueError("analysis summary: 'images' and 'results' must be lists")
    for index, image in enumerate(images):
        where = f"images[{index}]"
        _require(image, "sop_instance_uid", where)
        status = _require(image, "status", where)
        if status not in _IMAGE_STATUSES:
            raise ValueError(f"analysis summary: {where}.status {status!r} is not one of {sorted(_IMAGE_STATUSES)}")
    for index, result in enumerate(results):
        where = f"results[{index}]"
        for key in ("key", "sop_instance_uid", "sop_class_uid"):
            _require(result, key, where)
        kind = _require(result, "kind", where)
        if kind not in _RESULT_KINDS:
            raise ValueError(f"analysis summary: {where}.kind {kind!r} is not one of {sorted(_RESULT_KINDS)}")


def _due_columns() -> tuple[Any, ...]:
    """What :meth:`Ledger.due_studies` tells the dispatcher of each instance (the series and SOP
    class let it send CT series to their own queue)."""
    return (
        Instance.study_uid,
        Instance.sop_instance_uid,
        Instance.storage_key,
        Instance.series_instance_uid,
        Instance.sop_class_uid,
    )


def _study_outcome(instances: Sequence[Instance]) -> tuple[str, str | None]:
    """The study status and reason once no instance is waiting for a worker.

    Skipped objects (reports, presentation states... that came with the images) are no failure:
    they count only when the study holds nothing else, which is then not analysed, with why.
    """
    skipped = [i for i in instances if i.analysis_status == AnalysisStatus.SKIPPED]
    instances = [i for i in instances if i.analysis_status != AnalysisStatus.SKIPPED]
    if not instances:
        return StudyStatus.NOT_ANALYSED.value, "; ".join(
            sorted({i.analysis_reason or "no reason given" for i in skipped})
        )
    analysed = [i for i in instances if i.analysis_status == AnalysisStatus.ANALYSED]
    others = [i for i in instances if i.analysis_status != AnalysisStatus.ANALYSED]
    reasons = sorted({f"{i.analysis_status}: {i.analysis_reason or 'no reason given'}" for i in others})
    if analysed:
        if not others:
            return StudyStatus.DONE.value, None
        return StudyStatus.DONE.value, f"{len(analysed)} of {len(instances)} images analysed; " + "; ".join(reasons)
    if all(i.analysis_status == AnalysisStatus.NOT_ANALYSED for i in instances):
        return StudyStatus.NOT_ANALYSED.value, "; ".join(
            sorted({i.analysis_reason or "no reason given" for i in instances})
        )
    return StudyStatus.FAILED.value, "; ".join(reasons)


class Ledger:
    """All reads and writes of the ledger database; safe to share between threads."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self._display_url = parsed.render_as_string(hide_password=True)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        if self._is_sqlite and parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise LedgerError(
                    f"ledger database {self._display_url}: folder {folder} does not exist "
                    "(check PLEURA_DATABASE_URL or PLEURA_STORAGE_DIR)"
                )
        try:
            self.engine: Engine = create_engine(url, echo=echo, pool_pre_ping=not self._is_sqlite)
        except (SQLAlchemyError, ImportError) as exc:
            raise LedgerError(f"ledger database {self._display_url} (PLEURA_DATABASE_URL): {exc}") from exc
        if self._is_sqlite:
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Read-only transactions: the same pool, marked so that SQLite begins them deferred.
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)
        try:
            _create_schema(self.engine)
        except SQLAlchemyError as exc:
            raise LedgerError(
                f"cannot open the ledger database {self._display_url} (PLEURA_DATABASE_URL): {exc}"
            ) from exc
        if self._is_sqlite and parsed.database and parsed.database != ":memory:":
            # It holds patient IDs: its owner's only. SQLite gives the -wal and -shm it makes
            # later the database file's mode (node/private_files.py).
            database = Path(parsed.database).expanduser()
            for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))):
                if path.exists():
                    make_private(path)

    def __repr__(self) -> str:
        return f"Ledger({self._display_url!r})"

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction. On SQLite it begins deferred and reads a snapshot (WAL) without
        the write lock that every other transaction takes first; nothing may be written in it."""
        with self._read_sessions.begin() as session:
            yield session

    # -- receiving -------------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self.reading() as session:
            found = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
            return found is not None

    def holds(self, sop_instance_uid: str) -> Held | None:
        """Whether the SOP Instance UID was received before or is one of Pleura's results (one read)."""
        with self.reading() as session:
            return self._held(session, sop_instance_uid)

    @staticmethod
    def _held(session: Session, sop_instance_uid: str) -> Held | None:
        if session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)) is not None:
            return Held.INSTANCE
        if session.scalar(select(Result.id).where(Result.sop_instance_uid == sop_instance_uid)) is not None:
            return Held.RESULT
        return None

    def record_skipped(
        self,
        *,
        sop_instance_uid: str,
        study_uid: str,
        series_instance_uid: str,
        sop_class_uid: str,
        transfer_syntax_uid: str,
        storage_key: str,
        reason: str,
        calling_ae: str | None = None,
        patient_id: str | None = None,
        accession_number: str | None = None,
        received_at: datetime | None = None,
    ) -> Held | None:
        """Record an object Pleura does not analyse as skipped with `reason` (`storage_key` empty
        when it was not kept); None when recorded now, else what the ledger already held under
        that SOP Instance UID (then nothing is written). One transaction.

        It is never dispatched, and it re-opens no study: a PACS that routes an analysed study back
        with its reports must not start another analysis. A study it is the first object of is
        not analysed at once, with the reason, so it does not wait for images forever; an image
        arriving later re-opens it as usual (:meth:`record_instance`).
        """
        now = _as_utc(received_at) if received_at else utcnow()
        patient_id = patient_id[:64] if patient_id else None
        accession_number = accession_number[:64] if accession_number else None
        for attempt in range(3):
            try:
                with self._transaction() as session:
                    held = self._held(session, sop_instance_uid)
                    if held is not None:
                        return held
                    study = session.get(Study, study_uid)
                    if study is None:
                        study = Study(
                            study_uid=study_uid,
                            patient_id=patient_id,
                            accession_number=accession_number,
                            status=StudyStatus.NOT_ANALYSED.value,
                            reason=reason,
                            first_received_at=now,
                            last_received_at=now,
                        )
                        session.add(study)
                        session.flush()
                    else:
                        study.patient_id = study.patient_id or patient_id
                        study.accession_number = study.accession_number or accession_number
                        if study.status == StudyStatus.RECEIVING:  # still settling: it stays quiet longer
                            study.last_received_at = max(study.last_received_at, now)
                    session.add(
                        Instance(
                            sop_instance_uid=sop_instance_uid,
                            study_uid=study_uid,
                            series_instance_uid=series_instance_uid,
                            sop_class_uid=sop_class_uid,
                            transfer_syntax_uid=transfer_syntax_uid,
                            storage_key=storage_key,
                            received_at=now,
                            calling_ae=calling_ae,
                            analysis_status=AnalysisStatus.SKIPPED.value,
                            analysis_reason=reason,
                        )
                    )
                    if study.status == StudyStatus.NOT_ANALYSED and study.analysed_at is None:
                        # Nothing but skipped objects so far: the reason names every kind received.
                        session.flush()
                        rows = session.scalars(select(Instance).where(Instance.study_uid == study_uid))
                        study.reason = _study_outcome(list(rows))[1]
                return None
            except IntegrityError:  # another association recorded the same instance or study at once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def record_instance(
        self,
        *,
        sop_instance_uid: str,
        study_uid: str,
        series_instance_uid: str,
        sop_class_uid: str,
        transfer_syntax_uid: str,
        storage_key: str,
        calling_ae: str | None = None,
        patient_id: str | None = None,
        accession_number: str | None = None,
        received_at: datetime | None = None,
    ) -> bool:
        """Record a received instance; False when that SOP Instance UID was already recorded.

        A new instance for a study that is queued or already analysed puts the study back to
        receiving, so the new instance is analysed once the study settles again.
        """
        now = _as_utc(received_at) if received_at else utcnow()
        # Identifiers come from the sender's data set: never let an over-long one refuse an instance.
        patient_id = patient_id[:64] if patient_id else None
        accession_number = accession_number[:64] if accession_number else None
        for attempt in range(3):
            try:
                with self._transaction() as session:
                    known = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
                    if known is not None:
                        return False
                    study = session.get(Study, study_uid)
                    if study is None:
                        session.add(
                            Study(
                                study_uid=study_uid,
                                patient_id=patient_id or None,
                                accession_number=accession_number or None,
                                status=StudyStatus.RECEIVING.value,
                                first_received_at=now,
                                last_received_at=now,
                            )
                        )
                        session.flush()
                    else:
                        study.last_received_at = max(study.last_received_at, now)
                        study.patient_id = study.patient_id or patient_id or None
                        study.accession_number = study.accession_number or accession_number or None
                        if study.status != StudyStatus.RECEIVING:
                            log.info("study %s reopened by a new instance (was %s)", ref(study_uid), study.status)
                            study.status = StudyStatus.RECEIVING.value
                    session.add(
                        Instance(
                            sop_instance_uid=sop_instance_uid,
                            study_uid=study_uid,
                            series_instance_uid=series_instance_uid,
                            sop_class_uid=sop_class_uid,
                            transfer_syntax_uid=transfer_syntax_uid,
                            storage_key=storage_key,
                            received_at=now,
                            calling_ae=calling_ae,
                            analysis_status=AnalysisStatus.PENDING.value,
                        )
                    )
                return True
            except IntegrityError:
                # Another association recorded the same instance or created the same study at the
                # same moment: look again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- settling and dispatch -------------------------------------------------------------------

    def due_studies(self, settle_seconds: float, now: datetime | None = None) -> list[DueStudy]:
        """Studies still receiving whose last instance arrived `settle_seconds` ago or earlier,
        with their instances not yet sent to a worker (oldest study first)."""
        cutoff = (_as_utc(now) if now else utcnow()) - timedelta(seconds=settle_seconds)
        with self.reading() as session:
            rows = session.execute(
                select(*_due_columns())
                .join(Study, Study.study_uid == Instance.study_uid)
                .where(
                    Study.status == StudyStatus.RECEIVING.value,
                    Study.last_received_at <= cutoff,
                    Instance.analysis_status == AnalysisStatus.PENDING.value,
                )
                .order_by(Study.last_received_at, Study.study_uid, Instance.id)
            ).all()
            rows += self._rest_of_ct_series(session, rows)
        due: dict[str, DueStudy] = {}
        for study_uid, sop_uid, key, series_uid, sop_class in rows:
            # The series and SOP class let the dispatcher send CT series to their own queue.
            due.setdefault(study_uid, DueStudy(study_uid)).instances.append(
                {"sop_instance_uid": sop_uid, "key": key, "series_instance_uid": series_uid, "sop_class_uid": sop_class}
            )
        return list(due.values())

    @staticmethod
    def _rest_of_ct_series(session: Session, pending: Sequence[Any]) -> list[Any]:
        """A CT series is analysed whole: the already analysed slices of a series that got a new
        slice go with it (their status is left as it is until the new summary)."""
        from node.routing import CT_SOP_CLASSES

        series = {(row[0], row[3]) for row in pending if row[4] in CT_SOP_CLASSES}
        if not series:
            return []
        rest = session.execute(
            select(*_due_columns())
            .where(
                Instance.series_instance_uid.in_([uid for _, uid in series]),
                Instance.analysis_status.not_in([AnalysisStatus.PENDING.value, AnalysisStatus.SKIPPED.value]),
            )
            .order_by(Instance.id)
        ).all()
        return [row for row in rest if (row[0], row[3]) in series and row[4] in CT_SOP_CLASSES]

    def requeue_stale(self, timeout_seconds: float, *, now: datetime | None = None) -> list[str]:
        """Put instances queued longer than `timeout_seconds` back to pending, so their study is
        dispatched again: their task or its summary was lost (a worker killed, a broker restarted).
        The ledger, not the broker, decides what still needs analysing; tasks are idempotent."""
        now = _as_utc(now) if now else utcnow()
        cutoff = now - timedelta(seconds=timeout_seconds)
        with self._transaction() as session:
            studies = list(
                session.scalars(
                    select(Study)
                    .join(Instance, Instance.study_uid == Study.study_uid)
                    .where(Instance.analysis_status == AnalysisStatus.QUEUED.value, Study.queued_at <= cutoff)
                    .distinct()
                )
            )
            for study in studies:
                session.execute(
                    update(Instance)
                    .where(Instance.study_uid == study.study_uid, Instance.analysis_status == AnalysisStatus.QUEUED.value)
                    .values(analysis_status=AnalysisStatus.PENDING.value)
                )
                study.status = StudyStatus.RECEIVING.value
            return [study.study_uid for study in studies]

    def mark_queued(
        self,
        study_uid: str,
        sop_instance_uids: Sequence[str] | None = None,
        *,
        task_id: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """Record that these instances (default: all pending ones) were sent to a worker.

        The study becomes queued unless an instance arrived meanwhile; that one is sent in a later
        round, once the study has settled again.
        """
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise LedgerError(f"cannot mark study {study_uid} queued: the ledger does not know it")
            statement = update(Instance).where(
                Instance.study_uid == study_uid, Instance.analysis_status == AnalysisStatus.PENDING.value
            )
            if sop_instance_uids is not None:
                statement = statement.where(Instance.sop_instance_uid.in_(list(sop_instance_uids)))
            session.execute(statement.values(analysis_status=AnalysisStatus.QUEUED.value))
            study.queued_at = now
            study.task_id = task_id
            still_pending = session.scalar(
                select(func.count(Instance.id)).where(
                    Instance.study_uid == study_uid, Instance.analysis_status == AnalysisStatus.PENDING.value
                )
            )
            if not still_pending and study.status == StudyStatus.RECEIVING:
                study.status = StudyStatus.QUEUED.value

    # -- analysis --------------------------------------------------------------------------------

    def record_analysis(self, summary: dict[str, Any]) -> list[str]:
        """Record a worker's summary; returns the result SOP Instance UIDs it names.

        Recording the same summary twice changes nothing the second time.
        """
        _check_summary(summary)
        study_uid = str(summary["study_uid"])
        analysed_at = _parse_time(summary.get("analysed_at") or utcnow(), "'analysed_at'")
        model = summary["model"]
        with self._transaction() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise LedgerError(f"analysis summary names study {study_uid}, which the ledger does not know")
            instances = {
                row.sop_instance_uid: row
                for row in session.scalars(select(Instance).where(Instance.study_uid == study_uid))
            }
            for image in summary["images"]:
                row = instances.get(image["sop_instance_uid"])
                if row is None:
                    log.warning(
                        "analysis summary of study %s names instance %s, which is not in that study; ignored",
                        ref(study_uid),
                        ref(image["sop_instance_uid"]),
                    )
                    continue
                row.analysis_status = image["status"]
                row.analysis_reason = image.get("reason")
                row.probability = image.get("probability")
                row.flagged = image.get("flagged")
                row.area_px = image.get("area_px")
                row.area_cm2 = image.get("area_cm2")
                row.side = image.get("side")
                row.gap_mm = image.get("gap_mm")
                row.hemithorax_fraction = image.get("hemithorax_fraction")

            added = 0
            for result in summary["results"]:
                existing = session.scalar(select(Result).where(Result.sop_instance_uid == result["sop_instance_uid"]))
                if existing is not None:
                    continue
                added += 1
                session.add(
                    Result(
                        sop_instance_uid=result["sop_instance_uid"],
                        kind=result["kind"],
                        sop_class_uid=result["sop_class_uid"],
                        storage_key=result["key"],
                        study_uid=study_uid,
                        source_sop_instance_uid=result.get("source_sop_instance_uid"),
                        created_at=analysed_at,
                    )
                )
            session.flush()

            study.analysed_at = analysed_at
            if any(image["status"] == AnalysisStatus.ANALYSED for image in summary["images"]):
                study.model_name = str(model["name"])
                study.model_version = str(model["version"])
                study.synthetic_model = bool(model.get("synthetic_demo", False))
            analysed = [row for row in instances.values() if row.analysis_status == AnalysisStatus.ANALYSED]
            probabilities = [row.probability for row in analysed if row.probability is not None]
            study.probability = max(probabilities) if probabilities else None
            study.flagged = (bool(summary.get("flagged")) or any(row.flagged for row in analysed)) if analysed else None

            waiting = [
                row
                for row in instances.values()
                if row.analysis_status in (AnalysisStatus.PENDING, AnalysisStatus.QUEUED)
            ]
            # No instance waits: the study is finished even if it is still marked receiving, which
            # happens when the result comes back before the dispatcher has marked it queued.
            if not waiting:
                # A redelivered summary of a delivered study sets it to done and the refresh
                # below puts it back to delivered, since nothing new needs sending.
                study.status, study.reason = _study_outcome(list(instances.values()))
                if not added:  # new results get their outbox rows next, which refreshes the study
                    self._refresh_delivery(session, study, analysed_at)
        return [str(result["sop_instance_uid"]) for result in summary["results"]]

    # -- outbox ----------------------------------------------------------------------------------

    def create_outbox(
        self,
        study_uid: str,
        destinations: Sequence[str] | Mapping[str, Collection[str]],
        *,
        now: datetime | None = None,
    ) -> list[int]:
        """Make sure each result of the study has a row per destination that receives its kind;
        returns the pending ids.

        ``destinations`` maps each destination label to the result kinds it receives; a plain
        sequence of labels receives every kind. Existing rows are kept as they are, so calling
        this again creates nothing new.
        """
        if not isinstance(destinations, Mapping):
            destinations = {label: _RESULT_KINDS for label in destinations}
        now = _as_utc(now) if now else utcnow()
        pending: list[int] = []
        with self._transaction() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise LedgerError(f"cannot create deliveries for study {study_uid}: the ledger does not know it")
            results = session.scalars(select(Result).where(Result.study_uid == study_uid).order_by(Result.id)).all()
            for result in results:
                existing = {
                    entry.destination: entry
                    for entry in session.scalars(select(OutboxEntry).where(OutboxEntry.result_id == result.id))
                }
                for destination, kinds in destinations.items():
                    if result.kind not in kinds:
                        continue
                    entry = existing.get(destination)
                    if entry is None:
                        entry = OutboxEntry(
                            result_id=result.id,
                            destination=destination,
                            status=OutboxStatus.PENDING.value,
                            attempts=0,
                            next_attempt_at=now,
                            created_at=now,
                        )
                        session.add(entry)
                        session.flush()
                    if entry.status == OutboxStatus.PENDING:
                        pending.append(entry.id)
            self._refresh_delivery(session, study, now)
        return pending

    def outbox_entry(self, outbox_id: int) -> OutboxView | None:
        with self.reading() as session:
            entry = session.get(OutboxEntry, outbox_id)
            return None if entry is None else _outbox_view(entry, session.get_one(Result, entry.result_id))

    def list_outbox(self, study_uid: str | None = None) -> list[OutboxView]:
        with self.reading() as session:
            statement = select(OutboxEntry, Result).join(Result, Result.id == OutboxEntry.result_id)
            if study_uid is not None:
                statement = statement.where(Result.study_uid == study_uid)
            rows = session.execute(statement.order_by(OutboxEntry.id)).all()
            return [_outbox_view(entry, result) for entry, result in rows]

    def claim_outbox(
        self, outbox_id: int, *, now: datetime | None = None, lease_seconds: float = 600.0, slack_seconds: float = 1.0
    ) -> OutboxView | None:
        """Take a pending, due row for one delivery attempt, or None when it is not to be tried now.

        The claim moves the row's next attempt `lease_seconds` ahead, so a duplicate delivery
        message (a broker redelivery, the outbox sweeper) arriving meanwhile does nothing.
        """
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            entry = session.get(OutboxEntry, outbox_id, with_for_update=True)
            if entry is None or entry.status != OutboxStatus.PENDING:
                return None
            if entry.next_attempt_at is not None and entry.next_attempt_at > now + timedelta(seconds=slack_seconds):
                return None
            entry.next_attempt_at = now + timedelta(seconds=lease_seconds)
            return _outbox_view(entry, session.get_one(Result, entry.result_id))

    def record_delivery_success(self, outbox_id: int, *, now: datetime | None = None) -> OutboxView:
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            entry = self._outbox_row(session, outbox_id)
            entry.status = OutboxStatus.SENT.value
            entry.attempts += 1
            entry.last_attempt_at = now
            entry.sent_at = now
            entry.next_attempt_at = None
            entry.last_error = None
            result = session.get_one(Result, entry.result_id)
            study = session.get_one(Study, result.study_uid)
            self._refresh_delivery(session, study, now)
            return _outbox_view(entry, result)

    def record_delivery_failure(
        self,
        outbox_id: int,
        error: str,
        *,
        retry_seconds: float,
        max_attempts: int,
        now: datetime | None = None,
    ) -> OutboxView:
        """Count a failed attempt: schedule the next one (`retry_seconds`, doubling each time) or,
        at `max_attempts`, mark the row failed with the error as the reason."""
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            entry = self._outbox_row(session, outbox_id)
            entry.attempts += 1
            entry.last_attempt_at = now
            entry.last_error = error[:_ERROR_TEXT_LIMIT]
            result = session.get_one(Result, entry.result_id)
            if entry.attempts >= max_attempts:
                entry.status = OutboxStatus.FAILED.value
                entry.next_attempt_at = None
                study = session.get_one(Study, result.study_uid)
                study.reason = (
                    f"delivery of {result.kind} {result.sop_instance_uid} to {entry.destination} failed "
                    f"after {entry.attempts} attempts: {error}"
                )[:_ERROR_TEXT_LIMIT]
                session.flush()
                self._refresh_delivery(session, study, now)
            else:
                delay = retry_seconds * 2 ** (entry.attempts - 1)
                entry.next_attempt_at = now + timedelta(seconds=delay)
            return _outbox_view(entry, result)

    def mark_outbox_failed(self, outbox_id: int, reason: str, *, now: datetime | None = None) -> OutboxView:
        """Give up on a row at once (the destination was removed from the settings, say)."""
        with self._transaction() as session:
            entry = self._outbox_row(session, outbox_id)
            entry.status = OutboxStatus.FAILED.value
            entry.next_attempt_at = None
            entry.last_error = reason[:_ERROR_TEXT_LIMIT]
            result = session.get_one(Result, entry.result_id)
            study = session.get_one(Study, result.study_uid)
            study.reason = f"delivery of {result.kind} {result.sop_instance_uid} to {entry.destination}: {reason}"[
                :_ERROR_TEXT_LIMIT
            ]
            session.flush()
            self._refresh_delivery(session, study, _as_utc(now) if now else utcnow())
            return _outbox_view(entry, result)

    def requeue_overdue_outbox(self, margin_seconds: float, *, now: datetime | None = None) -> list[int]:
        """Pending rows whose next attempt is overdue by `margin_seconds` (their delivery message
        was lost); their next attempt is set to now, so each is picked again only after another
        margin has passed."""
        now = _as_utc(now) if now else utcnow()
        cutoff = now - timedelta(seconds=margin_seconds)
        with self._transaction() as session:
            ids = list(
                session.scalars(
                    select(OutboxEntry.id).where(
                        OutboxEntry.status == OutboxStatus.PENDING.value, OutboxEntry.next_attempt_at <= cutoff
                    )
                )
            )
            if ids:
                session.execute(update(OutboxEntry).where(OutboxEntry.id.in_(ids)).values(next_attempt_at=now))
            return ids

    @staticmethod
    def _outbox_row(session: Session, outbox_id: int) -> OutboxEntry:
        entry = session.get(OutboxEntry, outbox_id)
        if entry is None:
            raise LedgerError(f"outbox row {outbox_id} does not exist")
        return entry

    @staticmethod
    def _refresh_delivery(session: Session, study: Study, now: datetime) -> None:
        """A done study is delivered once every result has reached every destination that receives
        its kind, and delivery_failed once nothing is pending and some delivery was given up.

        The study's row is locked first: deliveries of one study finish in parallel (the export
        worker's threads, several export workers), and on PostgreSQL two transactions that each
        mark one row sent would otherwise each see the other row still pending, leaving the study
        "done" for ever. Under the lock, the last one sees every row sent. (SQLite serialises
        writers already.)
        """
        study = session.scalars(
            select(Study)
            .where(Study.study_uid == study.study_uid)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one()
        if study.status not in (StudyStatus.DONE, StudyStatus.DELIVERED, StudyStatus.DELIVERY_FAILED):
            return
        result_ids = list(session.scalars(select(Result.id).where(Result.study_uid == study.study_uid)))
        entries = (
            session.scalars(select(OutboxEntry).where(OutboxEntry.result_id.in_(result_ids))).all()
            if result_ids
            else []
        )
        # A result no destination receives (a SEG for a destination that takes only the SC) has no
        # row: the study is delivered once every row there is was sent.
        delivered = bool(entries) and all(e.status == OutboxStatus.SENT for e in entries)
        if delivered and study.status != StudyStatus.DELIVERED:
            study.status = StudyStatus.DELIVERED.value
            study.delivered_at = max((e.sent_at for e in entries if e.sent_at), default=now)
        elif not delivered:
            settled = bool(entries) and all(e.status != OutboxStatus.PENDING for e in entries)
            given_up = settled and any(e.status == OutboxStatus.FAILED for e in entries)
            study.status = (StudyStatus.DELIVERY_FAILED if given_up else StudyStatus.DONE).value

    # -- inspection ------------------------------------------------------------------------------

    def study_status(self, study_uid: str) -> dict[str, Any] | None:
        """Where a study stands: status, times, outcome, model, reason and instance count."""
        studies = self._studies(Study.study_uid == study_uid, limit=1)
        return studies[0] if studies else None

    def list_studies(self, *, status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Like :meth:`study_status` for many studies, most recently received first."""
        return self._studies(Study.status == status if status is not None else None, limit=limit)

    def _studies(self, condition: Any, limit: int) -> list[dict[str, Any]]:
        with self.reading() as session:
            aggregates = _study_aggregates()
            statement = select(Study, aggregates.c.instances, aggregates.c.area_px, aggregates.c.area_cm2).outerjoin(
                aggregates, aggregates.c.study_uid == Study.study_uid
            )
            if condition is not None:
                statement = statement.where(condition)
            rows = session.execute(statement.order_by(Study.last_received_at.desc()).limit(limit)).all()
            return [_study_dict(study, count or 0, area_px, area_cm2) for study, count, area_px, area_cm2 in rows]

    def list_instances(self, study_uid: str) -> list[InstanceView]:
        with self.reading() as session:
            rows = session.scalars(select(Instance).where(Instance.study_uid == study_uid).order_by(Instance.id))
            return [_instance_view(row) for row in rows]

    def list_images(self, study_uid: str) -> list[InstanceView]:
        """The study's instances but the skipped objects: the images the worklist shows, whose
        stored file the previews and outlines read (a skipped object may have none)."""
        with self.reading() as session:
            rows = session.scalars(
                select(Instance)
                .where(Instance.study_uid == study_uid, Instance.analysis_status != AnalysisStatus.SKIPPED.value)
                .order_by(Instance.id)
            )
            return [_instance_view(row) for row in rows]

    def list_results(self, study_uid: str) -> list[ResultView]:
        with self.reading() as session:
            rows = session.scalars(select(Result).where(Result.study_uid == study_uid).order_by(Result.id))
            return [_result_view(row) for row in rows]

    # -- worklist: study references, feedback, notifications (node/api, node/notify) --------------

    @staticmethod
    def _refs_for(session: Session, study_uids: Sequence[str]) -> dict[str, str]:
        """The opaque reference of each study, recorded on first use."""
        if not study_uids:
            return {}
        known = dict(
            session.execute(
                select(StudyRef.study_uid, StudyRef.ref).where(StudyRef.study_uid.in_(list(study_uids)))
            ).all()
        )
        for study_uid in study_uids:
            if study_uid not in known:
                known[study_uid] = study_ref_for(study_uid)
                session.add(StudyRef(ref=known[study_uid], study_uid=study_uid))
        session.flush()
        return known

    def analysis_started_at(self, study_uid: str) -> datetime | None:
        with self.reading() as session:
            return session.scalar(select(AnalysisStart.started_at).where(AnalysisStart.study_uid == study_uid))

    def study_for_ref(self, ref: str) -> str | None:
        """The study UID behind an opaque reference, or None."""
        with self.reading() as session:
            return session.scalar(select(StudyRef.study_uid).where(StudyRef.ref == ref))

    def study_ref(self, study_uid: str) -> str:
        for attempt in range(3):
            try:
                with self._transaction() as session:
                    return self._refs_for(session, [study_uid])[study_uid]
            except IntegrityError:  # another process recorded the same reference just now
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def worklist(
        self,
        *,
        flagged_only: bool = False,
        since: datetime | None = None,
        statuses: Sequence[str] | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Studies as :meth:`study_status` describes them, plus their opaque reference (`ref`) and
        the feedback in force (`feedback`, or None); flagged first, then most recently received."""
        for attempt in range(3):
            try:
                return self._worklist(flagged_only, since, statuses, limit)
            except IntegrityError:  # two processes recorded the same study reference at once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _worklist(
        self, flagged_only: bool, since: datetime | None, statuses: Sequence[str] | None, limit: int
    ) -> list[dict[str, Any]]:
        with self._transaction() as session:
            aggregates = _study_aggregates()
            latest = (
                select(Feedback.study_uid.label("study_uid"), func.max(Feedback.id).label("id"))
                .group_by(Feedback.study_uid)
                .subquery()
            )
            statement = (
                select(
                    Study,
                    aggregates.c.instances,
                    aggregates.c.area_px,
                    aggregates.c.area_cm2,
                    Feedback,
                    AnalysisStart.started_at,
                )
                .outerjoin(aggregates, aggregates.c.study_uid == Study.study_uid)
                .outerjoin(latest, latest.c.study_uid == Study.study_uid)
                .outerjoin(Feedback, Feedback.id == latest.c.id)
                .outerjoin(AnalysisStart, AnalysisStart.study_uid == Study.study_uid)
            )
            if flagged_only:
                statement = statement.where(Study.flagged.is_(True))
            if since is not None:
                statement = statement.where(Study.last_received_at >= _as_utc(since))
            if statuses:
                statement = statement.where(Study.status.in_(list(statuses)))
            statement = statement.order_by(
                case((Study.flagged.is_(True), 0), else_=1), Study.last_received_at.desc()
            ).limit(limit)
            rows = session.execute(statement).all()
            refs = self._refs_for(session, [study.study_uid for study, *_ in rows])
            findings = _flagged_findings(session, list(refs))
            studies = []
            for study, count, area_px, area_cm2, feedback, started_at in rows:
                entry = _study_dict(study, count or 0, area_px, area_cm2)
                entry["analysis_started_at"] = started_at
                entry["side"], entry["largest_gap_mm"] = findings.get(study.study_uid, (None, None))
                entry["ref"] = refs[study.study_uid]
                entry["feedback"] = _feedback_dict(feedback) if feedback is not None else None
                studies.append(entry)
            return studies

    def mark_analysing(self, study_uid: str, task_id: str | None = None, *, now: datetime | None = None) -> bool:
        """Record that a worker started on the study; False when the ledger does not know it."""
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            if session.get(Study, study_uid) is None:
                return False
            start = session.get(AnalysisStart, study_uid)
            if start is None:
                session.add(AnalysisStart(study_uid=study_uid, task_id=task_id, started_at=now))
            else:
                start.task_id, start.started_at = task_id, now
            return True

    def record_feedback(
        self,
        study_uid: str,
        verdict: str,
        user: str,
        *,
        comment: str | None = None,
        sop_instance_uid: str | None = None,
        mask_key: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Record a radiologist's verdict (confirmed, rejected, known, or corrected with the image
        and the mask's storage key) with who and when."""
        verdict = FeedbackVerdict(verdict).value
        if (verdict == FeedbackVerdict.CORRECTED) != (mask_key is not None):
            raise ValueError("a corrected verdict comes with a mask, and only it")
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise LedgerError("feedback names a study the ledger does not know")
            row = Feedback(
                study_uid=study_uid,
                verdict=verdict,
                user=user[:64],
                comment=comment[:_ERROR_TEXT_LIMIT] if comment else None,
                created_at=now,
                sop_instance_uid=sop_instance_uid,
                mask_key=mask_key,
                flagged=study.flagged,
                probability=study.probability,
                model_name=study.model_name,
                model_version=study.model_version,
            )
            session.add(row)
            session.flush()
            return _feedback_dict(row)

    def list_feedback(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Feedback, oldest first (the last one per study is in force)."""
        with self.reading() as session:
            statement = select(Feedback)
            if study_uid is not None:
                statement = statement.where(Feedback.study_uid == study_uid)
            return [_feedback_dict(row) for row in session.scalars(statement.order_by(Feedback.id))]

    def feedback_export(self) -> list[dict[str, Any]]:
        """The feedback in force per study with what retraining needs: each image's stored key and
        the key of the SEG that outlines it, the model's outputs and a label.

        `label` is 1 (pneumothorax) for confirmed, known and corrected, 0 for rejected. Per image,
        `label` is 0 for every image of a rejected study, 1 for the flagged images of a confirmed
        or known study and for the corrected image (whose `mask_key` is the radiologist's outline,
        to be used instead of `seg_key`), and None (not known) for the other images.

        A Segmentation sent back to Pleura (:meth:`record_seg_labels`) is a corrected outline by
        the sending AE: for each image it references, when it is newer than the study's verdict,
        it sets the image's `label` (1, or 0 for an empty outline) and its `seg_key` is the
        received SEG. A study labelled only that way is exported with the verdict "corrected",
        the AE title as `user`, and `label` 1 when any of its images has an outline. `labelled_by`
        says per image whose label it is.
        """
        with self.reading() as session:
            latest = select(func.max(Feedback.id)).group_by(Feedback.study_uid)
            verdicts = {
                row.study_uid: row
                for row in session.scalars(select(Feedback).where(Feedback.id.in_(latest)).order_by(Feedback.id))
            }
            seg_labels: dict[str, SegLabel] = {}  # the newest per image the ledger holds
            seg_studies: dict[str, list[SegLabel]] = {}
            for label, study_uid in session.execute(
                select(SegLabel, Instance.study_uid)
                .join(Instance, Instance.sop_instance_uid == SegLabel.sop_instance_uid)
                .order_by(SegLabel.id)
            ):
                seg_labels[label.sop_instance_uid] = label
                seg_studies.setdefault(study_uid, []).append(label)
            exported = []
            for study_uid in [*verdicts, *(uid for uid in seg_studies if uid not in verdicts)]:
                row = verdicts.get(study_uid)
                segs = {
                    result.source_sop_instance_uid: result.storage_key
                    for result in session.scalars(
                        select(Result).where(Result.study_uid == study_uid, Result.kind == "SEG")
                    )
                }
                images = []
                for instance in session.scalars(
                    select(Instance)
                    .where(Instance.study_uid == study_uid, Instance.analysis_status != AnalysisStatus.SKIPPED.value)
                    .order_by(Instance.id)
                ):
                    seg_label = seg_labels.get(instance.sop_instance_uid)
                    corrected = row is not None and row.verdict == FeedbackVerdict.CORRECTED
                    seg_key, mask_key = segs.get(instance.sop_instance_uid), None
                    if seg_label is not None and (row is None or seg_label.received_at >= row.created_at):
                        label: int | None = 1 if seg_label.positive else 0
                        seg_key, labelled_by = seg_label.storage_key, seg_label.calling_ae
                    elif row is None:
                        label, labelled_by = None, None
                    else:
                        if corrected:
                            label = 1 if instance.sop_instance_uid == row.sop_instance_uid else None
                            mask_key = row.mask_key if label == 1 else None
                        elif row.verdict != FeedbackVerdict.REJECTED:
                            label = 1 if instance.flagged else None
                        else:
                            label = 0
                        labelled_by = row.user if label is not None else None
                    images.append(
                        {
                            "sop_instance_uid": instance.sop_instance_uid,
                            "series_instance_uid": instance.series_instance_uid,
                            "instance_key": instance.storage_key,
                            "seg_key": seg_key,
                            "analysis_status": instance.analysis_status,
                            "probability": instance.probability,
                            "flagged": instance.flagged,
                            "area_px": instance.area_px,
                            "mask_key": mask_key,
                            "label": label,
                            "labelled_by": labelled_by,
                        }
                    )
                outlined = any(image["label"] == 1 for image in images)
                if row is not None:
                    entry = _feedback_dict(row)
                    entry.pop("id")
                    entry["label"] = 1 if row.verdict != FeedbackVerdict.REJECTED or outlined else 0
                else:
                    newest = seg_studies[study_uid][-1]
                    study = session.get_one(Study, study_uid)
                    entry = {
                        "study_uid": study_uid,
                        "verdict": FeedbackVerdict.CORRECTED.value,
                        "user": newest.calling_ae,
                        "comment": f"Segmentation {newest.seg_sop_instance_uid} sent back by {newest.calling_ae}",
                        "created_at": newest.received_at,
                        "sop_instance_uid": newest.sop_instance_uid,
                        "mask_key": None,
                        "flagged": study.flagged,
                        "probability": study.probability,
                        "model_name": study.model_name,
                        "model_version": study.model_version,
                        "label": 1 if outlined else 0,
                    }
                entry["images"] = images
                exported.append(entry)
            return exported

    # -- Segmentations sent back (node/seg_labels.py) ----------------------------------------------

    def is_result(self, sop_instance_uid: str) -> bool:
        """Whether the SOP Instance UID is one of the results Pleura wrote."""
        with self.reading() as session:
            return session.scalar(select(Result.id).where(Result.sop_instance_uid == sop_instance_uid)) is not None

    def has_seg_labels(self, seg_sop_instance_uid: str) -> bool:
        with self.reading() as session:
            found = session.scalar(select(SegLabel.id).where(SegLabel.seg_sop_instance_uid == seg_sop_instance_uid))
            return found is not None

    def record_seg_labels(
        self,
        *,
        seg_sop_instance_uid: str,
        seg_study_uid: str,
        storage_key: str,
        calling_ae: str,
        labels: Sequence[tuple[str, bool]],
        received_at: datetime | None = None,
    ) -> bool:
        """Record a received Segmentation as a label per image it references (``(SOP Instance UID,
        positive)``); False when that SEG was already recorded. It never touches the studies'
        analysis: a SEG is not analysed, and the images it labels need not be here yet."""
        now = _as_utc(received_at) if received_at else utcnow()
        try:
            with self._transaction() as session:
                known = session.scalar(select(SegLabel.id).where(SegLabel.seg_sop_instance_uid == seg_sop_instance_uid))
                if known is not None:
                    return False
                for sop_instance_uid, positive in labels:
                    session.add(
                        SegLabel(
                            seg_sop_instance_uid=seg_sop_instance_uid,
                            seg_study_uid=seg_study_uid,
                            sop_instance_uid=sop_instance_uid,
                            storage_key=storage_key,
                            positive=bool(positive),
                            calling_ae=calling_ae.strip()[:16],
                            received_at=now,
                        )
                    )
            return True
        except IntegrityError:  # another association recorded the same SEG at the same moment
            return False

    def enqueue_flag_notifications(
        self,
        build: Callable[[dict[str, Any], str], list[dict[str, Any]]],
        *,
        now: datetime | None = None,
        first_look_within_seconds: float = 86400.0,
    ) -> list[int]:
        """Create notification rows for every analysed study whose flag in force changed since it
        was last announced: `build(study, event)` ("flagged" or "withdrawn") returns the messages,
        each ``{"channel", "target", "payload", "max_attempts"}``. Returns the new rows' ids.

        A study is looked at again only when its analysis or its feedback changed, and the rows
        and the announced state are written in one transaction, so each change is announced once.
        A study seen for the first time more than `first_look_within_seconds` after its analysis
        (a ledger from before notifications existed) is recorded without being announced.
        """
        now = _as_utc(now) if now else utcnow()
        created: list[int] = []
        with self._transaction() as session:
            latest = (
                select(Feedback.study_uid.label("study_uid"), func.max(Feedback.id).label("id"))
                .group_by(Feedback.study_uid)
                .subquery()
            )
            rows = session.execute(
                select(Study, NotificationState, Feedback)
                .outerjoin(NotificationState, NotificationState.study_uid == Study.study_uid)
                .outerjoin(latest, latest.c.study_uid == Study.study_uid)
                .outerjoin(Feedback, Feedback.id == latest.c.id)
                .where(
                    Study.analysed_at.is_not(None),
                    or_(
                        NotificationState.study_uid.is_(None),
                        NotificationState.analysed_at.is_(None),
                        NotificationState.analysed_at != Study.analysed_at,
                        func.coalesce(latest.c.id, 0) != NotificationState.feedback_id,
                    ),
                )
                .order_by(Study.analysed_at)
            ).all()
            if not rows:
                return created
            refs = self._refs_for(session, [study.study_uid for study, _, _ in rows])
            for study, state, feedback in rows:
                verdict = feedback.verdict if feedback is not None else None
                flagged = flag_in_force(study.flagged, verdict)
                announced = bool(state.flagged) if state is not None else False
                stale = state is None and study.analysed_at < now - timedelta(seconds=first_look_within_seconds)
                if flagged != announced and not stale:
                    event = "flagged" if flagged else "withdrawn"
                    info = self._notification_info(session, study, refs[study.study_uid], feedback)
                    for message in build(info, event):
                        row = Notification(
                            study_uid=study.study_uid,
                            event=event,
                            channel=str(message["channel"]),
                            target=str(message["target"])[:300],
                            payload=str(message["payload"]),
                            status=OutboxStatus.PENDING.value,
                            attempts=0,
                            max_attempts=int(message.get("max_attempts", 10)),
                            next_attempt_at=now,
                            created_at=now,
                        )
                        session.add(row)
                        session.flush()
                        created.append(row.id)
                if state is None:
                    state = NotificationState(study_uid=study.study_uid)
                    session.add(state)
                state.flagged = flagged
                state.analysed_at = study.analysed_at
                state.feedback_id = feedback.id if feedback is not None else 0
                state.checked_at = now
        return created

    @staticmethod
    def _notification_info(session: Session, study: Study, ref: str, feedback: Feedback | None) -> dict[str, Any]:
        instances = session.scalars(select(Instance).where(Instance.study_uid == study.study_uid)).all()
        flagged = [i for i in instances if i.flagged]
        info = _study_dict(
            study,
            len(instances),
            max((i.area_px for i in flagged if i.area_px is not None), default=None),
            max((i.area_cm2 for i in flagged if i.area_cm2 is not None), default=None),
        )
        info["ref"] = ref
        info["feedback"] = _feedback_dict(feedback) if feedback is not None else None
        info["images"] = [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "probability": i.probability,
                "flagged": i.flagged,
                "area_px": i.area_px,
                "area_cm2": i.area_cm2,
                # Filled once the analysis reports them (side and pleural gap, from the result writers).
                "side": getattr(i, "side", None),
                "largest_gap_mm": getattr(i, "gap_mm", None),
                "reason": i.analysis_reason,
            }
            for i in instances
        ]
        return info

    def due_notifications(self, *, now: datetime | None = None, limit: int = 100) -> list[int]:
        now = _as_utc(now) if now else utcnow()
        with self.reading() as session:
            return list(
                session.scalars(
                    select(Notification.id)
                    .where(Notification.status == OutboxStatus.PENDING.value, Notification.next_attempt_at <= now)
                    .order_by(Notification.id)
                    .limit(limit)
                )
            )

    def claim_notification(
        self, notification_id: int, *, now: datetime | None = None, lease_seconds: float = 300.0
    ) -> NotificationView | None:
        """Take a pending, due row for one attempt (moving its next attempt `lease_seconds` ahead),
        or None when it is not to be tried now."""
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            row = session.get(Notification, notification_id, with_for_update=True)
            if row is None or row.status != OutboxStatus.PENDING:
                return None
            if row.next_attempt_at is not None and row.next_attempt_at > now:
                return None
            row.next_attempt_at = now + timedelta(seconds=lease_seconds)
            return _notification_view(row)

    def record_notification_sent(
        self, notification_id: int, response: str | None, *, now: datetime | None = None
    ) -> NotificationView:
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            row = self._notification_row(session, notification_id)
            row.status = OutboxStatus.SENT.value
            row.attempts += 1
            row.last_attempt_at = row.sent_at = now
            row.next_attempt_at = None
            row.last_error = None
            row.response = response[:_ERROR_TEXT_LIMIT] if response else None
            return _notification_view(row)

    def record_notification_failure(
        self, notification_id: int, error: str, *, retry_seconds: float, now: datetime | None = None
    ) -> NotificationView:
        """Count a failed attempt: try again after `retry_seconds` (doubling each time, at most an
        hour) or, at the row's max_attempts, mark it failed."""
        now = _as_utc(now) if now else utcnow()
        with self._transaction() as session:
            row = self._notification_row(session, notification_id)
            row.attempts += 1
            row.last_attempt_at = now
            row.last_error = error[:_ERROR_TEXT_LIMIT]
            if row.attempts >= row.max_attempts:
                row.status = OutboxStatus.FAILED.value
                row.next_attempt_at = None
            else:
                delay = min(retry_seconds * 2 ** (row.attempts - 1), 3600.0)
                row.next_attempt_at = now + timedelta(seconds=delay)
            return _notification_view(row)

    def list_notifications(self, study_uid: str | None = None, *, limit: int = 500) -> list[NotificationView]:
        """Notifications, newest first."""
        with self.reading() as session:
            statement = select(Notification)
            if study_uid is not None:
                statement = statement.where(Notification.study_uid == study_uid)
            rows = session.scalars(statement.order_by(Notification.id.desc()).limit(limit))
            return [_notification_view(row) for row in rows]

    @staticmethod
    def _notification_row(session: Session, notification_id: int) -> Notification:
        row = session.get(Notification, notification_id)
        if row is None:
            raise LedgerError(f"notification {notification_id} does not exist")
        return row


SCHEMA_LOCK_KEY = 0x504C4555  # "PLEU": the advisory lock that serialises schema changes on PostgreSQL


def _create_schema(engine: Engine) -> None:
    """Create the missing tables and columns, once, even when several processes start together.

    The node and its export worker (and, on several hosts, more processes) open the ledger at the
    same moment on a new database. PostgreSQL's CREATE TABLE is not safe against a concurrent one
    (a duplicate-key error on its catalogue), so there the work runs under a transaction-level
    advisory lock; SQLite serialises writers itself.
    """
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            Base.metadata.create_all(connection)
            _add_missing_columns(connection)
        return
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        _add_missing_columns(connection)


def _add_missing_columns(connection: Connection) -> None:
    """Add the nullable columns a newer Pleura defines to a ledger an older one created.

    ``create_all`` makes missing tables but never alters existing ones; every column added since
    the first release is nullable, so an ``ALTER TABLE ... ADD COLUMN`` upgrades a ledger in place
    (no data is rewritten). Anything else would need a real migration and fails loudly instead.
    """
    inspector = inspect(connection)
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise LedgerError(
                    f"the ledger's table {table.name} lacks the column {column.name}, which cannot be added in place"
                )
            type_sql = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {type_sql}')
            log.info("ledger upgraded: added column %s.%s", table.name, column.name)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_on_begin), so the driver must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")  # an instance is acknowledged only once recorded
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    # Take the write lock at the start: a deferred transaction that reads and then writes can fail
    # at once with "database is locked" when another process wrote in between, busy timeout or not.
    # A read-only transaction (Ledger.reading) never writes, so it needs no lock.
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
