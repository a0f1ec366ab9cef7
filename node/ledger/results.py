"""Results and their outbox: a worker's analysis recorded, one row per result and destination,
delivery attempts, and when a study counts as delivered."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from contract.messages import RESULT_KINDS, AnalysisSummary, MessageError
from node.ledger.schema import (
    ERROR_TEXT_LIMIT,
    AnalysisRecord,
    AnalysisStart,
    AnalysisStatus,
    Instance,
    LedgerError,
    OutboxEntry,
    OutboxStatus,
    Result,
    Study,
    StudyStatus,
    as_utc,
    utcnow,
)
from node.ledger.sessions import LedgerSessions
from node.ledger.studies import study_outcome
from node.ledger.views import OutboxView, outbox_view
from node.privacy import ref

log = logging.getLogger(__name__)


class SummaryError(LedgerError, ValueError):
    """A worker's summary that does not validate (:class:`~contract.messages.AnalysisSummary`); the
    text names the field."""


def read_summary(summary: AnalysisSummary | dict[str, Any]) -> AnalysisSummary:
    """The summary validated, whichever version of the worker wrote it."""
    try:
        return AnalysisSummary.from_message(summary)
    except MessageError as exc:
        raise SummaryError(str(exc)) from None


class ResultLedger(LedgerSessions):
    """Analyses, results and their deliveries."""

    # -- analysis --------------------------------------------------------------------------------

    def record_analysis(self, summary: AnalysisSummary | dict[str, Any]) -> list[str]:
        """Record a worker's summary (the message, or its wire form); returns the result SOP
        Instance UIDs it names. A summary that does not validate raises :class:`SummaryError`.

        Recording the same summary twice changes nothing the second time.
        """
        summary = read_summary(summary)
        study_uid = summary.study_uid
        analysed_at = as_utc(summary.analysed_at or utcnow())
        with self._transaction() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise LedgerError(f"analysis summary names study {study_uid}, which the ledger does not know")
            instances = {
                row.sop_instance_uid: row
                for row in session.scalars(select(Instance).where(Instance.study_uid == study_uid))
            }
            for image in summary.images:
                row = instances.get(image.sop_instance_uid)
                if row is None:
                    log.warning(
                        "analysis summary of study %s names instance %s, which is not in that study; ignored",
                        ref(study_uid),
                        ref(image.sop_instance_uid),
                    )
                    continue
                row.analysis_status = image.analysis_status
                row.analysis_reason = image.analysis_reason
                row.probability = image.probability
                row.flagged = image.flagged
                row.area_px = image.area_px
                row.area_cm2 = image.area_cm2
                row.side = image.side
                row.gap_mm = image.gap_mm
                row.hemithorax_fraction = image.hemithorax_fraction

            # A summary answering a re-analysis request is delivered again in full: a result that
            # exists already (the same model on the same images gives the same UIDs) gets its
            # deliveries back to pending instead of being left as sent long ago.
            reanalysis = study.reanalysis_requested_at is not None
            resent: list[int] = []
            added = 0
            for result in summary.results:
                existing = session.scalar(select(Result).where(Result.sop_instance_uid == result.sop_instance_uid))
                if existing is not None:
                    resent.append(existing.id)
                    continue
                added += 1
                session.add(
                    Result(
                        sop_instance_uid=result.sop_instance_uid,
                        kind=result.kind,
                        sop_class_uid=result.sop_class_uid,
                        storage_key=result.storage_key,
                        study_uid=study_uid,
                        source_sop_instance_uid=result.source_sop_instance_uid,
                        created_at=analysed_at,
                    )
                )
            session.flush()

            study.analysed_at = analysed_at
            if any(image.analysis_status == AnalysisStatus.ANALYSED for image in summary.images):
                study.model_name = summary.model.name
                study.model_version = summary.model.version
                study.synthetic_model = summary.model.synthetic_demo
            analysed = [row for row in instances.values() if row.analysis_status == AnalysisStatus.ANALYSED]
            probabilities = [row.probability for row in analysed if row.probability is not None]
            study.probability = max(probabilities) if probabilities else None
            study.flagged = (summary.flagged or any(row.flagged for row in analysed)) if analysed else None
            if summary.volume_ml is not None:  # a CT series: the study shows its largest volume
                earlier = None if reanalysis else study.volume_ml
                study.volume_ml = max(summary.volume_ml, earlier or 0.0)
            self._record_history(session, study, summary, analysed_at, reanalysis)
            start = session.get(AnalysisStart, study_uid)
            if start is not None:  # an answer: the study's lease ends, and its lapses are forgiven
                start.heartbeat_at, start.lapses = None, 0
            if reanalysis:
                study.reanalysis_requested_at = None
                if resent:
                    self._deliver_again(session, resent, analysed_at)

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
                study.status, study.reason = study_outcome(list(instances.values()))
                if not added:  # new results get their outbox rows next, which refreshes the study
                    self._refresh_delivery(session, study, analysed_at)
        return [result.sop_instance_uid for result in summary.results]

    @staticmethod
    def _record_history(
        session: Session, study: Study, summary: AnalysisSummary, analysed_at: datetime, reanalysis: bool
    ) -> None:
        """One :class:`AnalysisRecord` per analysis that analysed an image (the same summary
        recorded twice makes one)."""
        if not any(image.analysis_status == AnalysisStatus.ANALYSED for image in summary.images):
            return
        known = session.scalar(
            select(AnalysisRecord.id).where(
                AnalysisRecord.study_uid == study.study_uid,
                AnalysisRecord.analysed_at == analysed_at,
                AnalysisRecord.model_version == summary.model.version,
            )
        )
        if known is not None:
            return
        report = next((result.sop_instance_uid for result in summary.results if result.kind == "SR"), None)
        session.add(
            AnalysisRecord(
                study_uid=study.study_uid,
                model_name=summary.model.name,
                model_version=summary.model.version,
                analysed_at=analysed_at,
                flagged=study.flagged,
                probability=study.probability,
                reanalysis=reanalysis,
                sr_sop_instance_uid=report,
            )
        )

    @staticmethod
    def _deliver_again(session: Session, result_ids: Sequence[int], now: datetime) -> None:
        for entry in session.scalars(select(OutboxEntry).where(OutboxEntry.result_id.in_(list(result_ids)))):
            entry.status = OutboxStatus.PENDING.value
            entry.attempts = 0
            entry.next_attempt_at = now
            entry.last_error = None
            entry.sent_at = None
            entry.response = None

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
            destinations = {label: RESULT_KINDS for label in destinations}
        now = as_utc(now) if now else utcnow()
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
            return None if entry is None else outbox_view(entry, session.get_one(Result, entry.result_id))

    def list_outbox(self, study_uid: str | None = None) -> list[OutboxView]:
        with self.reading() as session:
            statement = select(OutboxEntry, Result).join(Result, Result.id == OutboxEntry.result_id)
            if study_uid is not None:
                statement = statement.where(Result.study_uid == study_uid)
            rows = session.execute(statement.order_by(OutboxEntry.id)).all()
            return [outbox_view(entry, result) for entry, result in rows]

    def claim_outbox(
        self, outbox_id: int, *, now: datetime | None = None, lease_seconds: float = 600.0, slack_seconds: float = 1.0
    ) -> OutboxView | None:
        """Take a pending, due row for one delivery attempt, or None when it is not to be tried now.

        The claim moves the row's next attempt `lease_seconds` ahead, so a duplicate delivery
        message (a broker redelivery, the outbox sweeper) arriving meanwhile does nothing.
        """
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            entry = session.get(OutboxEntry, outbox_id, with_for_update=True)
            if entry is None or entry.status != OutboxStatus.PENDING:
                return None
            if entry.next_attempt_at is not None and entry.next_attempt_at > now + timedelta(seconds=slack_seconds):
                return None
            entry.next_attempt_at = now + timedelta(seconds=lease_seconds)
            return outbox_view(entry, session.get_one(Result, entry.result_id))

    def record_delivery_success(
        self, outbox_id: int, *, now: datetime | None = None, response: str | None = None
    ) -> OutboxView:
        """Mark the row sent; `response` keeps a warning the destination gave with its success."""
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            entry = self._outbox_row(session, outbox_id)
            entry.status = OutboxStatus.SENT.value
            entry.attempts += 1
            entry.last_attempt_at = now
            entry.sent_at = now
            entry.next_attempt_at = None
            entry.last_error = None
            entry.response = response[:ERROR_TEXT_LIMIT] if response else None
            result = session.get_one(Result, entry.result_id)
            study = session.get_one(Study, result.study_uid)
            self._refresh_delivery(session, study, now)
            return outbox_view(entry, result)

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
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            entry = self._outbox_row(session, outbox_id)
            entry.attempts += 1
            entry.last_attempt_at = now
            entry.last_error = error[:ERROR_TEXT_LIMIT]
            result = session.get_one(Result, entry.result_id)
            if entry.attempts >= max_attempts:
                entry.status = OutboxStatus.FAILED.value
                entry.next_attempt_at = None
                study = session.get_one(Study, result.study_uid)
                study.reason = (
                    f"delivery of {result.kind} {result.sop_instance_uid} to {entry.destination} failed "
                    f"after {entry.attempts} attempts: {error}"
                )[:ERROR_TEXT_LIMIT]
                session.flush()
                self._refresh_delivery(session, study, now)
            else:
                delay = retry_seconds * 2 ** (entry.attempts - 1)
                entry.next_attempt_at = now + timedelta(seconds=delay)
            return outbox_view(entry, result)

    def mark_outbox_failed(self, outbox_id: int, reason: str, *, now: datetime | None = None) -> OutboxView:
        """Give up on a row at once (the destination was removed from the settings, say)."""
        with self._transaction() as session:
            entry = self._outbox_row(session, outbox_id)
            entry.status = OutboxStatus.FAILED.value
            entry.next_attempt_at = None
            entry.last_error = reason[:ERROR_TEXT_LIMIT]
            result = session.get_one(Result, entry.result_id)
            study = session.get_one(Study, result.study_uid)
            study.reason = f"delivery of {result.kind} {result.sop_instance_uid} to {entry.destination}: {reason}"[
                :ERROR_TEXT_LIMIT
            ]
            session.flush()
            self._refresh_delivery(session, study, as_utc(now) if now else utcnow())
            return outbox_view(entry, result)

    def requeue_overdue_outbox(self, margin_seconds: float, *, now: datetime | None = None) -> list[int]:
        """Pending rows whose next attempt is overdue by `margin_seconds` (their delivery message
        was lost); their next attempt is set to now, so each is picked again only after another
        margin has passed."""
        now = as_utc(now) if now else utcnow()
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

    def is_result(self, sop_instance_uid: str) -> bool:
        """Whether the SOP Instance UID is one of the results Pleura wrote."""
        with self.reading() as session:
            return session.scalar(select(Result.id).where(Result.sop_instance_uid == sop_instance_uid)) is not None
