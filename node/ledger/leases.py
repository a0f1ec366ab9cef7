"""Analysis leases: a running analysis holds its study while its heartbeats arrive; when they stop
(the worker was killed: SIGKILL, the OOM killer, a lost host), the settle loop takes the study back
within seconds and dispatches it again, whatever the broker did with the dead worker's message.

The rule, on the node's clock alone (worker clocks may differ):

- a worker's start and each of its heartbeats (every ``lease / 4`` s) set ``heartbeat_at``;
  dispatching a study clears it, so only a sign of life after the newest dispatch holds the lease;
- a study with queued instances whose last heartbeat is older than the lease has *lapsed*. It is
  taken back only when the export queue (which carries the heartbeats) holds no message: a backlog
  there delays heartbeats, not analyses, and taking a study back on a delayed heartbeat would only
  analyse it twice (harmless, results are idempotent, but wasted);
- the first lapse dispatches the study again; the second dispatches it with a reason, so a worker
  writes a "not analysed" report (the analysis crashed) without running the networks; should even
  that be lost, the third marks the study not analysed in the ledger, with the reason. A recorded
  analysis clears the count.

A study whose analysis never started is not leased: that is the queue's business
(:meth:`StudyLedger.requeue_stale` and ``analysis_timeout_seconds``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from node.ledger.schema import AnalysisStart, AnalysisStatus, Instance, Study, StudyStatus, as_utc, utcnow
from node.ledger.sessions import LedgerSessions
from node.ledger.studies import study_outcome

CRASHED_REASON = "the analysis crashed twice (its worker process ended while analysing this study); not retried"
"""What the report and the worklist say of a study that killed its worker twice."""
LOST_REASON = (
    "the analysis crashed twice and the worker writing its report was lost too; not retried"
)
"""What the ledger says of a study whose "not analysed" report could not be written either."""
REPORT_AFTER_LAPSES = 2
"""After this many lapses the study is dispatched to write its "not analysed" report."""
GIVE_UP_AFTER_LAPSES = 3
"""After this many the ledger marks the study not analysed without a report."""


@dataclass(frozen=True)
class LapsedStudy:
    """A study taken back from a worker that stopped beating: its UID, how many of its leases have
    lapsed so far (this one included), and the task that held it (to revoke on the broker)."""

    study_uid: str
    lapses: int
    task_id: str | None


class LeaseLedger(LedgerSessions):
    def mark_analysing(self, study_uid: str, task_id: str | None = None, *, now: datetime | None = None) -> bool:
        """Record that a worker started on the study (``now``: the worker's clock); False when the
        ledger does not know it. The start is the analysis's first heartbeat (on the node's clock)."""
        beat = utcnow()
        return self._sign_of_life(study_uid, task_id, beat, started_at=as_utc(now) if now else beat)

    def record_heartbeat(self, study_uid: str, task_id: str | None = None, *, now: datetime | None = None) -> bool:
        """A running analysis of the study is alive (the node's clock ``now``); False when the
        ledger does not know the study."""
        return self._sign_of_life(study_uid, task_id, as_utc(now) if now else utcnow())

    def _sign_of_life(
        self, study_uid: str, task_id: str | None, beat: datetime, *, started_at: datetime | None = None
    ) -> bool:
        """Hold the study's lease from ``beat``; with ``started_at`` (a start) the analysis's start
        and task too. A heartbeat of a study with no start yet counts as its start."""
        with self._transaction() as session:
            if session.get(Study, study_uid) is None:
                return False
            start = session.get(AnalysisStart, study_uid)
            if start is None:
                session.add(AnalysisStart(study_uid=study_uid, task_id=task_id, started_at=started_at or beat,
                                          heartbeat_at=beat))
            elif started_at is not None:
                start.task_id, start.started_at, start.heartbeat_at = task_id, started_at, beat
            else:
                start.heartbeat_at = beat
            return True

    def reclaim_lapsed(
        self, lease_seconds: float, *, now: datetime | None = None, export_waiting: Callable[[], bool] | None = None
    ) -> list[LapsedStudy]:
        """Take back every study whose running analysis has sent no heartbeat for ``lease_seconds``
        (module docstring): its queued instances go back to pending (dispatched again next round),
        or, at the third lapse, to not analysed. ``export_waiting()`` is asked only when some study
        has lapsed; while it says the export queue holds messages, nothing is taken back."""
        now = as_utc(now) if now else utcnow()
        cutoff = now - timedelta(seconds=lease_seconds)
        with self._transaction() as session:
            lapsed = session.scalars(
                select(AnalysisStart)
                .join(Instance, Instance.study_uid == AnalysisStart.study_uid)
                .where(
                    Instance.analysis_status == AnalysisStatus.QUEUED.value,
                    AnalysisStart.heartbeat_at.is_not(None),
                    AnalysisStart.heartbeat_at <= cutoff,
                )
                .distinct()
            ).all()
            if not lapsed or (export_waiting is not None and export_waiting()):
                return []
            taken: list[LapsedStudy] = []
            for start in lapsed:
                study = session.get(Study, start.study_uid)
                start.lapses = (start.lapses or 0) + 1
                start.heartbeat_at = None
                queued = session.scalars(
                    select(Instance).where(
                        Instance.study_uid == start.study_uid, Instance.analysis_status == AnalysisStatus.QUEUED.value
                    )
                ).all()
                if start.lapses >= GIVE_UP_AFTER_LAPSES:
                    for instance in queued:
                        instance.analysis_status = AnalysisStatus.NOT_ANALYSED.value
                        instance.analysis_reason = LOST_REASON
                    session.flush()
                    everything = session.scalars(select(Instance).where(Instance.study_uid == start.study_uid)).all()
                    if not any(i.analysis_status == AnalysisStatus.PENDING for i in everything):
                        study.status, study.reason = study_outcome(list(everything))
                else:
                    for instance in queued:
                        instance.analysis_status = AnalysisStatus.PENDING.value
                    study.status = StudyStatus.RECEIVING.value
                taken.append(LapsedStudy(start.study_uid, start.lapses, study.task_id))
            return taken

    def lapse_options(self, study_uid: str) -> dict[str, Any]:
        """The task options a study's lapses call for: after :data:`REPORT_AFTER_LAPSES`, the
        reason its "not analysed" report gives (``not_analysed_reason``); else ``{}``."""
        with self.reading() as session:
            start = session.get(AnalysisStart, study_uid)
            if start is None or (start.lapses or 0) < REPORT_AFTER_LAPSES:
                return {}
            return {"not_analysed_reason": CRASHED_REASON}

    def analysis_lapses(self, study_uid: str) -> int:
        """How many leases of the study have lapsed since its last recorded analysis."""
        with self.reading() as session:
            return int(session.scalar(select(AnalysisStart.lapses).where(AnalysisStart.study_uid == study_uid)) or 0)
