"""Instances and studies: receiving (a new instance, a duplicate, a skipped object), settling and
dispatch (due studies, queued, stale)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, not_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from contract.messages import InstanceRef
from node.ledger.schema import (
    AnalysisStart,
    Association,
    AnalysisStatus,
    Held,
    Instance,
    LedgerError,
    Result,
    Study,
    StudyStatus,
    as_utc,
    utcnow,
)
from node.ledger.sessions import LedgerSessions
from node.ledger.views import DueStudy
from node.privacy import ref
from node.routing import CT_SOP_CLASSES

log = logging.getLogger(__name__)


def due_columns() -> tuple[Any, ...]:
    """What :meth:`Ledger.due_studies` tells the dispatcher of each instance (the series and SOP
    class let it send CT series to their own queue)."""
    return (
        Instance.study_uid,
        Instance.sop_instance_uid,
        Instance.storage_key,
        Instance.series_instance_uid,
        Instance.sop_class_uid,
    )


def study_outcome(instances: Sequence[Instance]) -> tuple[str, str | None]:
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


class StudyLedger(LedgerSessions):
    """Receiving instances, settling and dispatching studies."""

    # -- receiving -------------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self.reading() as session:
            found = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
            return found is not None

    def identity_conflict(self, sop_instance_uid: str, study_uid: str, patient_id: str | None) -> str | None:
        """Why an image may not join the ledger as it claims to (one read), else None.

        A SOP Instance UID already held under another study, or a Study Instance UID already held
        for another Patient ID, means two objects claim one identity: merging them would put one
        patient's image in another's study (or drop it silently). Such an instance is refused and
        kept in quarantine for the PACS team instead. An empty Patient ID on either side is not a
        conflict (modalities leave it out).
        """
        patient_id = (patient_id or "")[:64]
        with self.reading() as session:
            held_in = session.scalar(select(Instance.study_uid).where(Instance.sop_instance_uid == sop_instance_uid))
            if held_in is not None and held_in != study_uid:
                return "its SOP Instance UID was already received in another study"
            held_for = session.scalar(select(Study.patient_id).where(Study.study_uid == study_uid))
            if held_for and patient_id and held_for != patient_id:
                return "its Study Instance UID is already held for another Patient ID"
        return None

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
        association_id: str | None = None,
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
        now = as_utc(received_at) if received_at else utcnow()
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
                            association_id=association_id,
                            analysis_status=AnalysisStatus.SKIPPED.value,
                            analysis_reason=reason,
                        )
                    )
                    if study.status == StudyStatus.NOT_ANALYSED and study.analysed_at is None:
                        # Nothing but skipped objects so far: the reason names every kind received.
                        session.flush()
                        rows = session.scalars(select(Instance).where(Instance.study_uid == study_uid))
                        study.reason = study_outcome(list(rows))[1]
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
        association_id: str | None = None,
        urgent: bool = False,
        patient_id: str | None = None,
        accession_number: str | None = None,
        received_at: datetime | None = None,
    ) -> bool:
        """Record a received instance; False when that SOP Instance UID was already recorded.

        A new instance for a study that is queued or already analysed puts the study back to
        receiving, so the new instance is analysed once the study settles again. ``association_id``
        names the association that carried it (:meth:`open_association`); an ``urgent`` instance
        makes its study urgent (the STAT queue).
        """
        now = as_utc(received_at) if received_at else utcnow()
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
                                urgent=urgent,
                            )
                        )
                        session.flush()
                    else:
                        study.urgent = study.urgent or urgent
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
                            association_id=association_id,
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

    # -- associations ----------------------------------------------------------------------------

    def open_association(self, association_id: str, calling_ae: str | None, *, now: datetime | None = None) -> None:
        """Record an association that is about to store its first instance."""
        with self._transaction() as session:
            if session.get(Association, association_id) is None:
                session.add(
                    Association(
                        association_id=association_id,
                        calling_ae=(calling_ae or "").strip()[:16] or None,
                        opened_at=as_utc(now) if now else utcnow(),
                    )
                )

    def end_association(self, association_id: str, *, released: bool, now: datetime | None = None) -> bool:
        """Record how an association ended: ``released`` normally (A-RELEASE), else aborted or
        dropped. Only its first end counts. True when a release was recorded now: its studies may
        become due after the grace."""
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            association = session.get(Association, association_id)
            if association is None or association.released_at is not None or association.aborted_at is not None:
                return False
            if released:
                association.released_at = now
            else:
                association.aborted_at = now
            return released

    # -- settling and dispatch -------------------------------------------------------------------

    def due_studies(
        self, settle_seconds: float, now: datetime | None = None, *, grace_seconds: float | None = None
    ) -> list[DueStudy]:
        """Studies still receiving, with their instances not yet sent to a worker (oldest study
        first), that are due: their last instance arrived `settle_seconds` ago or earlier, or
        (with `grace_seconds`) `grace_seconds` ago and every pending instance came over an
        association released normally at least `grace_seconds` ago. A study with a pending
        instance from an association still open, aborted, or not tracked waits the quiet time."""
        now = as_utc(now) if now else utcnow()
        cutoff = now - timedelta(seconds=settle_seconds)
        settled = Study.last_received_at <= cutoff
        if grace_seconds is not None and grace_seconds < settle_seconds:
            settled = or_(settled, self._released_since(now - timedelta(seconds=grace_seconds)))
        with self.reading() as session:
            rows = session.execute(
                select(*due_columns(), Study.urgent)
                .join(Study, Study.study_uid == Instance.study_uid)
                .where(
                    Study.status == StudyStatus.RECEIVING.value,
                    settled,
                    Instance.analysis_status == AnalysisStatus.PENDING.value,
                )
                .order_by(Study.urgent.desc(), Study.last_received_at, Study.study_uid, Instance.id)
            ).all()
            urgent = {row[0] for row in rows if row[-1]}
            rows = [tuple(row[:-1]) for row in rows]
            rows += self._rest_of_ct_series(session, rows)
        due: dict[str, DueStudy] = {}
        for study_uid, sop_instance_uid, storage_key, series_instance_uid, sop_class_uid in rows:
            # The series and SOP class let the dispatcher send CT series to their own queue.
            instance = InstanceRef(
                sop_instance_uid=sop_instance_uid,
                storage_key=storage_key,
                series_instance_uid=series_instance_uid,
                sop_class_uid=sop_class_uid,
            )
            due.setdefault(study_uid, DueStudy(study_uid, urgent=study_uid in urgent)).instances.append(
                instance.to_message()
            )
        return list(due.values())

    def next_settled_at(self, settle_seconds: float) -> datetime | None:
        """When the next study still receiving becomes due on the quiet time alone: its last
        instance's arrival plus ``settle_seconds`` (the settle loop wakes then, not at its next
        tick); None when no study waits."""
        with self.reading() as session:
            last = session.scalar(
                select(func.min(Study.last_received_at))
                .join(Instance, Instance.study_uid == Study.study_uid)
                .where(
                    Study.status == StudyStatus.RECEIVING.value,
                    Instance.analysis_status == AnalysisStatus.PENDING.value,
                )
            )
        return None if last is None else as_utc(last) + timedelta(seconds=settle_seconds)

    @staticmethod
    def _released_since(grace_cutoff: datetime) -> Any:
        """The condition of a study that had nothing for the grace and whose every pending instance
        came over an association released (not aborted) before ``grace_cutoff``."""
        pending = aliased(Instance)  # not the outer query's instance
        released = exists().where(
            Association.association_id == pending.association_id,
            Association.released_at.is_not(None),
            Association.released_at <= grace_cutoff,
        )
        waiting = (
            select(pending.id)
            .where(
                pending.study_uid == Study.study_uid,
                pending.analysis_status == AnalysisStatus.PENDING.value,
                not_(released),
            )
            .correlate(Study)
            .exists()
        )
        return (Study.last_received_at <= grace_cutoff) & not_(waiting)

    @staticmethod
    def _rest_of_ct_series(session: Session, pending: Sequence[Any]) -> list[Any]:
        """A CT series is analysed whole: the already analysed slices of a series that got a new
        slice go with it (their status is left as it is until the new summary)."""
        series = {(row[0], row[3]) for row in pending if row[4] in CT_SOP_CLASSES}
        if not series:
            return []
        rest = session.execute(
            select(*due_columns())
            .where(
                Instance.series_instance_uid.in_([uid for _, uid in series]),
                Instance.analysis_status.not_in([AnalysisStatus.PENDING.value, AnalysisStatus.SKIPPED.value]),
            )
            .order_by(Instance.id)
        ).all()
        return [row for row in rest if (row[0], row[3]) in series and row[4] in CT_SOP_CLASSES]

    def requeue_stale(
        self, timeout_seconds: float, *, now: datetime | None = None, tasks_waiting: Callable[[], bool] | None = None
    ) -> list[str]:
        """Put instances queued longer than `timeout_seconds` back to pending, so their study is
        dispatched again: their task or its summary was lost (a worker killed, a broker restarted).
        The ledger, not the broker, decides what still needs analysing; tasks are idempotent.

        A study whose task no worker has started yet is most likely still waiting in the broker
        (no worker running): sending it again would only queue a second analysis of it. So such a
        study is dispatched again only when ``tasks_waiting()`` says the analysis queues hold no
        message (its task was lost); the broker is asked only when there is such a study.
        """
        now = as_utc(now) if now else utcnow()
        cutoff = now - timedelta(seconds=timeout_seconds)
        with self._transaction() as session:
            stale = session.execute(
                select(Study, AnalysisStart.started_at)
                .join(Instance, Instance.study_uid == Study.study_uid)
                .outerjoin(AnalysisStart, AnalysisStart.study_uid == Study.study_uid)
                .where(Instance.analysis_status == AnalysisStatus.QUEUED.value, Study.queued_at <= cutoff)
                .distinct()
            ).all()
            unstarted = [study for study, started in stale if started is None or as_utc(started) < as_utc(study.queued_at)]
            keep = set()
            if unstarted and tasks_waiting is not None and tasks_waiting():
                keep = {study.study_uid for study in unstarted}
            studies = [study for study, _ in stale if study.study_uid not in keep]
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
        now = as_utc(now) if now else utcnow()
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
            # Only a sign of life after this dispatch holds the study's lease (node/ledger/leases.py).
            start = session.get(AnalysisStart, study_uid)
            if start is not None:
                start.heartbeat_at = None
