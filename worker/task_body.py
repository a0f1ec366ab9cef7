"""The body every analysis task shares (radiograph studies, CT series): say it started, analyse,
retry, hand the summary to the node side."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from celery import Task

from contract.messages import AnalysisOptions
from contract.tasks import ANALYSIS_HEARTBEAT, ANALYSIS_STARTED, RECORD_ANALYSIS
from node.privacy import error_text, ref
from node.shared_storage import analyse_with_shared_storage

log = logging.getLogger(__name__)

MAX_RETRIES = 3


def analyse_and_report(
    task: Task,
    study_uid: str,
    instances: list[dict[str, str]],
    options: dict[str, Any] | None,
    analyse: Callable[[str, list[dict[str, str]], AnalysisOptions], dict[str, Any]],
) -> dict[str, Any]:
    """The body every analysis task shares: say it started, read the task's ``options``
    (:class:`~contract.messages.AnalysisOptions`; none, from an older node: the defaults), run
    ``analyse(study_uid, instances, options)`` with its files from and to the shared storage when
    there is one, retry an unexpected error with a growing delay (after the last try the node is
    told the study failed, with the reason; options that do not validate end so too), and send the
    summary to the node side."""
    from worker.analysis import failed_summary  # imports torch: only when a task runs, in the pool's process

    try:  # tell the worklist; a message lost here costs nothing but the word "analysing"
        started = datetime.now(timezone.utc).isoformat()  # the worker's clock, like "analysed_at"
        task.app.send_task(ANALYSIS_STARTED, args=[study_uid, task.request.id, started])
    except Exception as exc:
        log.warning("cannot report the start of an analysis: %s", exc)
    try:
        chosen = AnalysisOptions.from_message(options or {})
        with Heartbeat(task, study_uid, chosen.heartbeat_seconds):
            summary = analyse_with_shared_storage(analyse, task.app.pleura_settings, study_uid, instances, chosen)
    except Exception as exc:
        if task.request.retries < MAX_RETRIES:
            log.warning("analysis of a study failed (%s); retrying", exc)
            raise task.retry(exc=exc, countdown=5 * 2**task.request.retries) from exc
        log.exception("analysis of a study failed for good")
        # The reason reaches the report and the worklist: no path or UID there (error_text); the
        # log above has the error whole.
        summary = failed_summary(study_uid, instances, f"analysis failed ({error_text(exc)})")
    try:
        task.app.send_task(RECORD_ANALYSIS, args=[summary])
    except Exception as exc:
        # The broker is unreachable: analyse again later (idempotent) rather than lose the
        # summary. Should every retry fail, the node dispatches the study again in time.
        raise task.retry(exc=exc, countdown=30, max_retries=MAX_RETRIES + 10) from exc
    # Celery logs what a task returns: references, not UIDs (see node/privacy.py).
    return {"study": ref(study_uid), "flagged": summary["flagged"], "results": len(summary["results"])}


class Heartbeat:
    """While an analysis runs, tell the node every ``interval`` seconds that it is alive
    (``pleura.analysis_heartbeat``), from a thread of its own, so that the node takes the study
    back within its lease when this process dies (node/ledger/leases.py). A lost beat costs
    nothing while the next arrives within the lease. Without an interval (a message from an older
    node) nothing is sent."""

    def __init__(self, task: Task, study_uid: str, interval: float | None) -> None:
        # The task's request is thread-local: its id is read here, in the task's thread.
        self.app, self.study_uid, self.task_id = task.app, study_uid, task.request.id
        self.interval = float(interval) if interval else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            self._thread = threading.Thread(target=self._beat, name="pleura-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _beat(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            try:
                self.app.send_task(ANALYSIS_HEARTBEAT, args=[self.study_uid, self.task_id])
            except Exception as exc:  # the broker is away; the next beat may reach it
                log.warning("cannot send an analysis heartbeat: %s", exc)
