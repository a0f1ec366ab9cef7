"""Study settling: a study is analysed once no new instance has arrived for `settle_seconds`, or
for `grace_seconds` when every pending instance came over an association its sender released
normally (the SCP wakes the loop on each release, and each round wakes it again when the next
waiting study reaches its quiet time, so a study is dispatched when it is due, not on the next
tick); a study whose running analysis stopped beating (its worker was killed) is taken back and dispatched
again (node/ledger/leases.py).

A study is marked queued only after the broker took its task, so a broker that is down delays the
analysis but loses nothing: the study is still due in the next round. Several nodes on one
PostgreSQL ledger take turns (an advisory lock per round), so each study is dispatched by one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from node.dispatch import Dispatcher
from node.ledger import DueStudy, Ledger, utcnow
from node.ledger.leases import GIVE_UP_AFTER_LAPSES
from node.periodic import PeriodicTask
from node.privacy import ref

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 0.5
DISPATCH_LOCK_KEY = 0x504C4453  # "PLDS": one node at a time dispatches settled studies


def due_studies(
    ledger: Ledger, settle_seconds: float, now: datetime | None = None, *, grace_seconds: float | None = None
) -> list[DueStudy]:
    """Studies that had no new instance for `settle_seconds` (or `grace_seconds` after their
    associations were released), with their instances not yet dispatched."""
    return ledger.due_studies(settle_seconds, now or utcnow(), grace_seconds=grace_seconds)


class SettleLoop(PeriodicTask):
    """A background thread that dispatches each settled study once."""

    thread_name = "pleura-settle"

    def __init__(
        self,
        ledger: Ledger,
        dispatch: Dispatcher,
        settle_seconds: float,
        *,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        analysis_timeout_seconds: float | None = None,
        tasks_waiting: Callable[[], bool] | None = None,
        lease_seconds: float | None = None,
        export_waiting: Callable[[], bool] | None = None,
        revoke: Callable[[str | None], None] | None = None,
        grace_seconds: float | None = None,
    ) -> None:
        super().__init__(interval_seconds)
        self.grace_seconds = grace_seconds
        self.ledger = ledger
        # A running analysis whose heartbeats stopped for `lease_seconds` is taken back
        # (node/ledger/leases.py); `revoke` drops the dead task's message should the broker return it.
        self.lease_seconds = lease_seconds
        self.export_waiting = export_waiting
        self.revoke = revoke
        # Whether the broker still holds analysis tasks: a study queued past the timeout whose
        # task never started is dispatched again only when it does not (Ledger.requeue_stale).
        self.tasks_waiting = tasks_waiting
        self.analysis_timeout_seconds = analysis_timeout_seconds
        self.dispatch = dispatch
        self.settle_seconds = settle_seconds
        self._failing = False

    def association_released(self) -> None:
        """A sender released an association that stored instances: their study may be due once the
        grace has passed (a small margin past it, so the round finds it due)."""
        if self.grace_seconds is not None:
            self.wake(self.grace_seconds + 0.01)

    def run_once(self, now: datetime | None = None) -> list[str]:
        """Dispatch every due study; returns the study UIDs that were dispatched. Nodes sharing a
        ledger take turns: a round another node is doing is skipped (it dispatches those studies)."""
        with self.ledger.taking_turns(DISPATCH_LOCK_KEY) as mine:
            dispatched = self._dispatch_due(now) if mine else []
        self._wake_when_settled()
        return dispatched

    def _wake_when_settled(self) -> None:
        """Wake when the next waiting study settles on the quiet time, rather than at the tick
        after. A study already past it (its dispatch failed: the broker is down) waits for the tick."""
        try:
            at = self.ledger.next_settled_at(self.settle_seconds)
        except Exception:  # the ledger is away: the tick tries again
            return
        if at is not None:
            delay = (at - utcnow()).total_seconds()
            if delay > 0:
                self.wake(delay + 0.01)

    def _dispatch_due(self, now: datetime | None) -> list[str]:
        dispatched: list[str] = []
        if self.analysis_timeout_seconds is not None:
            requeued = self.ledger.requeue_stale(self.analysis_timeout_seconds, now=now, tasks_waiting=self.tasks_waiting)
            for study_uid in requeued:
                log.warning(
                    "study %s was queued for over %.0f s without a result; dispatching it again",
                    ref(study_uid),
                    self.analysis_timeout_seconds,
                )
        if self.lease_seconds is not None:
            self._reclaim_lapsed(now)
        for study in due_studies(self.ledger, self.settle_seconds, now, grace_seconds=self.grace_seconds):
            sop_uids = [instance["sop_instance_uid"] for instance in study.instances]
            try:
                # A requested re-analysis names the report it supersedes in the task's options; a
                # study that killed its worker twice, the reason its "not analysed" report gives.
                extra = {
                    **self.ledger.reanalysis_options(study.study_uid),
                    **self.ledger.lapse_options(study.study_uid),
                }
                if study.urgent:
                    extra["urgent"] = True
                if extra:
                    task_id = self.dispatch(study.study_uid, study.instances, extra)
                else:
                    task_id = self.dispatch(study.study_uid, study.instances)
            except Exception as exc:
                # Most likely the broker is down: every other study would fail the same way.
                level = logging.DEBUG if self._failing else logging.WARNING
                log.log(level, "cannot dispatch study %s (will try again): %s", ref(study.study_uid), exc)
                self._failing = True
                break
            if self._failing:
                log.info("dispatching works again")
                self._failing = False
            try:
                self.ledger.mark_queued(study.study_uid, sop_uids, task_id=task_id, now=now)
            except Exception as exc:
                # Sent but not recorded: the study is sent again next round (the task is idempotent).
                log.warning("study %s dispatched but the ledger could not record it: %s", ref(study.study_uid), exc)
                break
            log.info("study %s dispatched with %d instance(s), task %s", ref(study.study_uid), len(sop_uids), task_id)
            dispatched.append(study.study_uid)
        return dispatched

    def _reclaim_lapsed(self, now: datetime | None) -> None:
        assert self.lease_seconds is not None
        for lapsed in self.ledger.reclaim_lapsed(self.lease_seconds, now=now, export_waiting=self.export_waiting):
            log.warning(
                "the analysis of study %s sent no heartbeat for %.0f s (its worker was lost; lapse %d); %s",
                ref(lapsed.study_uid), self.lease_seconds, lapsed.lapses,
                "dispatching it again" if lapsed.lapses < GIVE_UP_AFTER_LAPSES else "it is marked not analysed",
            )
            if self.revoke is not None:
                self.revoke(lapsed.task_id)
