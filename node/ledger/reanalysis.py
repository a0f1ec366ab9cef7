"""Re-analysis: which studies to analyse again, the request, and the history of a study's analyses.

A request puts every instance of a finished study that Pleura analyses (all but the skipped
objects) back to pending and the study back to receiving, so the settle loop dispatches it like a
study just received, with the study's current report named in the task's options
(``supersedes``) so that the new report can say which one it replaces. The summary that answers
it is recorded like any other, with two differences (:meth:`ResultLedger.record_analysis`): it
adds a re-analysis to the study's history, and its results are delivered to every destination
again, those the same model made before (same UIDs) included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from node.ledger.schema import (
    AnalysisRecord,
    AnalysisStatus,
    Instance,
    Result,
    Study,
    StudyStatus,
    as_utc,
    utcnow,
)
from node.ledger.sessions import LedgerSessions

FINISHED = (
    StudyStatus.DONE.value,
    StudyStatus.DELIVERED.value,
    StudyStatus.DELIVERY_FAILED.value,
    StudyStatus.NOT_ANALYSED.value,
    StudyStatus.FAILED.value,
)
"""The statuses of a study that may be analysed again (one on its way to a worker already is not)."""


@dataclass(frozen=True)
class AnalysisHistoryView:
    """One analysis of a study, newest first in :meth:`ReanalysisLedger.list_analyses`."""

    model_name: str
    model_version: str
    analysed_at: datetime
    flagged: bool | None
    probability: float | None
    reanalysis: bool
    sr_sop_instance_uid: str | None


class ReanalysisLedger(LedgerSessions):
    """Re-analysis requests and the analysis history."""

    def reanalysis_candidates(
        self,
        *,
        study_uids: Sequence[str] | None = None,
        received_since: datetime | None = None,
        model_version: str | None = None,
    ) -> list[str]:
        """The finished studies among ``study_uids`` (all when None), received at or after
        ``received_since``, last analysed by ``model_version`` (``VERSION`` or ``NAME/VERSION``);
        oldest first."""
        statement = select(Study.study_uid).where(Study.status.in_(FINISHED))
        if study_uids is not None:
            statement = statement.where(Study.study_uid.in_(list(study_uids)))
        if received_since is not None:
            statement = statement.where(Study.last_received_at >= as_utc(received_since))
        if model_version is not None:
            name, _, version = model_version.rpartition("/")
            statement = statement.where(Study.model_version == version)
            if name:
                statement = statement.where(Study.model_name == name)
        with self.reading() as session:
            return list(session.scalars(statement.order_by(Study.first_received_at, Study.study_uid)))

    def request_reanalysis(self, study_uids: Sequence[str], *, now: datetime | None = None) -> list[str]:
        """Send these studies to the workers again (those that are finished); returns them."""
        now = as_utc(now) if now else utcnow()
        requested: list[str] = []
        with self._transaction() as session:
            for study in session.scalars(
                select(Study).where(Study.study_uid.in_(list(study_uids)), Study.status.in_(FINISHED))
            ):
                session.execute(
                    update(Instance)
                    .where(
                        Instance.study_uid == study.study_uid,
                        Instance.analysis_status != AnalysisStatus.SKIPPED.value,
                    )
                    .values(analysis_status=AnalysisStatus.PENDING.value)
                )
                study.status = StudyStatus.RECEIVING.value
                study.reason = None
                study.reanalysis_requested_at = now
                requested.append(study.study_uid)
        return requested

    def reanalysis_options(self, study_uid: str) -> dict[str, Any]:
        """The task options of a requested re-analysis (``{}`` for any other dispatch): the
        study's current report, which the new one supersedes."""
        with self.reading() as session:
            study = session.get(Study, study_uid)
            if study is None or study.reanalysis_requested_at is None:
                return {}
            report = session.scalars(
                select(Result).where(Result.study_uid == study_uid, Result.kind == "SR").order_by(Result.id.desc())
            ).first()
            if report is None:
                return {}
            return {
                "supersedes": {
                    "study_uid": study_uid,
                    "sop_instance_uid": report.sop_instance_uid,
                    "sop_class_uid": report.sop_class_uid,
                    "storage_key": report.storage_key,
                    "model_name": study.model_name,
                    "model_version": study.model_version,
                }
            }

    def list_analyses(self, study_uid: str) -> list[AnalysisHistoryView]:
        """Every analysis of the study, newest first."""
        with self.reading() as session:
            rows = session.scalars(
                select(AnalysisRecord)
                .where(AnalysisRecord.study_uid == study_uid)
                .order_by(AnalysisRecord.analysed_at.desc(), AnalysisRecord.id.desc())
            )
            return [
                AnalysisHistoryView(
                    model_name=row.model_name,
                    model_version=row.model_version,
                    analysed_at=row.analysed_at,
                    flagged=row.flagged,
                    probability=row.probability,
                    reanalysis=row.reanalysis,
                    sr_sop_instance_uid=row.sr_sop_instance_uid,
                )
                for row in rows
            ]
