"""The ledger's read views: plain snapshots handed out of the ledger (so callers never hold a
session), the functions that build them from rows, and the queries that read studies, instances,
results and the worklist."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.ledger.schema import (
    AnalysisStart,
    AnalysisStatus,
    Feedback,
    FeedbackVerdict,
    Instance,
    Notification,
    OutboxEntry,
    Result,
    Study,
    StudyRef,
    StudyStatus,
    as_utc,
)
from node.ledger.sessions import LedgerSessions


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


def notification_view(row: Notification) -> NotificationView:
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


def feedback_dict(row: Feedback) -> dict[str, Any]:
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


def flagged_findings(session: Session, study_uids: list[str]) -> dict[str, tuple[str | None, float | None]]:
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
    result_storage_key: str
    destination: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_error: str | None
    sent_at: datetime | None
    response: str | None = None  # a warning the destination gave with its success


@dataclass(frozen=True)
class DueStudy:
    """A settled study and its instances that no worker has been asked about yet, each an
    :class:`~contract.messages.InstanceRef` in its wire form, as the analysis task carries it."""

    study_uid: str
    instances: list[dict[str, str]] = field(default_factory=list)
    urgent: bool = False  # a sender marked it urgent: it goes to the STAT queue


def study_dict(study: Study, instances: int, area_px: int | None, area_cm2: float | None) -> dict[str, Any]:
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
        "volume_ml": study.volume_ml,
        "area_px": area_px,
        "area_cm2": area_cm2,
        "model_name": study.model_name,
        "model_version": study.model_version,
        "synthetic_model": study.synthetic_model,
        "reason": study.reason,
        "instances": instances,
    }


def study_aggregates() -> Any:
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


def instance_view(row: Instance) -> InstanceView:
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


def result_view(row: Result) -> ResultView:
    return ResultView(
        sop_instance_uid=row.sop_instance_uid,
        kind=row.kind,
        sop_class_uid=row.sop_class_uid,
        storage_key=row.storage_key,
        study_uid=row.study_uid,
        source_sop_instance_uid=row.source_sop_instance_uid,
        created_at=row.created_at,
    )


def outbox_view(entry: OutboxEntry, result: Result) -> OutboxView:
    return OutboxView(
        id=entry.id,
        study_uid=result.study_uid,
        result_uid=result.sop_instance_uid,
        result_kind=result.kind,
        result_storage_key=result.storage_key,
        destination=entry.destination,
        status=entry.status,
        attempts=entry.attempts,
        next_attempt_at=entry.next_attempt_at,
        last_attempt_at=entry.last_attempt_at,
        last_error=entry.last_error,
        sent_at=entry.sent_at,
        response=entry.response,
    )


def refs_for(session: Session, study_uids: Sequence[str]) -> dict[str, str]:
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


class ViewLedger(LedgerSessions):
    """Reads of studies, instances and results, and the worklist."""

    # -- inspection ------------------------------------------------------------------------------

    def change_mark(self) -> tuple[Any, ...]:
        """A value that changes whenever the worklist may show something new: a study or instance
        received, queued, taken, analysed, delivered, a verdict, a notification (cheap: maxima
        and counts, for the page's event stream to poll)."""
        with self.reading() as session:
            studies = session.execute(
                select(
                    func.count(Study.study_uid),
                    func.max(Study.last_received_at),
                    func.max(Study.queued_at),
                    func.max(Study.analysed_at),
                    func.max(Study.delivered_at),
                    func.sum(case((Study.status == StudyStatus.FAILED.value, 1), else_=0)),
                )
            ).one()
            return (
                *tuple(studies),
                session.scalar(select(func.max(Instance.id))),
                session.scalar(select(func.max(Feedback.id))),
                session.scalar(select(func.max(AnalysisStart.started_at))),
                session.scalar(select(func.max(Notification.id))),
            )

    def study_status(self, study_uid: str) -> dict[str, Any] | None:
        """Where a study stands: status, times, outcome, model, reason and instance count."""
        studies = self._studies(Study.study_uid == study_uid, limit=1)
        return studies[0] if studies else None

    def list_studies(self, *, status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Like :meth:`study_status` for many studies, most recently received first."""
        return self._studies(Study.status == status if status is not None else None, limit=limit)

    def _studies(self, condition: Any, limit: int) -> list[dict[str, Any]]:
        with self.reading() as session:
            aggregates = study_aggregates()
            statement = select(Study, aggregates.c.instances, aggregates.c.area_px, aggregates.c.area_cm2).outerjoin(
                aggregates, aggregates.c.study_uid == Study.study_uid
            )
            if condition is not None:
                statement = statement.where(condition)
            rows = session.execute(statement.order_by(Study.last_received_at.desc()).limit(limit)).all()
            return [study_dict(study, count or 0, area_px, area_cm2) for study, count, area_px, area_cm2 in rows]

    def list_instances(self, study_uid: str) -> list[InstanceView]:
        with self.reading() as session:
            rows = session.scalars(select(Instance).where(Instance.study_uid == study_uid).order_by(Instance.id))
            return [instance_view(row) for row in rows]

    def list_images(self, study_uid: str) -> list[InstanceView]:
        """The study's instances but the skipped objects: the images the worklist shows, whose
        stored file the previews and outlines read (a skipped object may have none)."""
        with self.reading() as session:
            rows = session.scalars(
                select(Instance)
                .where(Instance.study_uid == study_uid, Instance.analysis_status != AnalysisStatus.SKIPPED.value)
                .order_by(Instance.id)
            )
            return [instance_view(row) for row in rows]

    def list_results(self, study_uid: str) -> list[ResultView]:
        with self.reading() as session:
            rows = session.scalars(select(Result).where(Result.study_uid == study_uid).order_by(Result.id))
            return [result_view(row) for row in rows]

    # -- the worklist: study references, analysis starts (node/api) --------------------------------

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
                    return refs_for(session, [study_uid])[study_uid]
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
            aggregates = study_aggregates()
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
                statement = statement.where(Study.last_received_at >= as_utc(since))
            if statuses:
                statement = statement.where(Study.status.in_(list(statuses)))
            statement = statement.order_by(
                case((Study.flagged.is_(True), 0), else_=1), Study.last_received_at.desc()
            ).limit(limit)
            rows = session.execute(statement).all()
            refs = refs_for(session, [study.study_uid for study, *_ in rows])
            findings = flagged_findings(session, list(refs))
            studies = []
            for study, count, area_px, area_cm2, feedback, started_at in rows:
                entry = study_dict(study, count or 0, area_px, area_cm2)
                entry["analysis_started_at"] = started_at
                entry["side"], entry["largest_gap_mm"] = findings.get(study.study_uid, (None, None))
                entry["ref"] = refs[study.study_uid]
                entry["feedback"] = feedback_dict(feedback) if feedback is not None else None
                studies.append(entry)
            return studies
