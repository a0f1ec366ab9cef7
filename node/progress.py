"""Node-side Celery tasks on the export queue that record when a worker starts on a study, so the
worklist can say "analysing" rather than "queued", and its heartbeats, which hold the study's
lease (node/ledger/leases.py)."""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime

from celery import Celery, Task

from node.tasks import node_context
from contract.tasks import ANALYSIS_HEARTBEAT, ANALYSIS_STARTED

log = logging.getLogger(__name__)


def register_progress_tasks(app: Celery) -> tuple[Task, Task]:
    @app.task(name=ANALYSIS_STARTED, ignore_result=True)
    def analysis_started(study_uid: str, task_id: str | None = None, started_at: str | None = None) -> bool:
        """Best effort: a lost or late message only leaves the study shown as queued.

        `started_at` is the worker's clock (older workers send none: the node's clock is used),
        so the analysis time in the metrics is measured on one clock."""
        when = None
        if started_at:
            with contextlib.suppress(ValueError):
                when = datetime.fromisoformat(started_at)
        return node_context(app).ledger.mark_analysing(str(study_uid), task_id, now=when)

    @app.task(name=ANALYSIS_HEARTBEAT, ignore_result=True)
    def analysis_heartbeat(study_uid: str, task_id: str | None = None) -> bool:
        """The analysis is alive: recorded on the node's clock (workers' clocks may differ)."""
        return node_context(app).ledger.record_heartbeat(str(study_uid), task_id)

    return analysis_started, analysis_heartbeat
