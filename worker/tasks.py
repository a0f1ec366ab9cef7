"""The worker's Celery task: analyse a study by reference and hand the summary to the node side."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from node.privacy import error_text, ref
from node.shared_storage import analyse_with_shared_storage
from worker.celery_app import ANALYSE_STUDY, ANALYSIS_STARTED, RECORD_ANALYSIS

if TYPE_CHECKING:
    from worker.ct_tasks import CTDemoBuilder

log = logging.getLogger(__name__)

MAX_RETRIES = 3

_models_lock = threading.Lock()


def _analyser(app: Celery):
    """The analyser for the next task: the registry's active radiograph model, reloaded when it
    changes (worker/active_model.py). The task keeps this reference until it ends."""
    from worker.active_model import ActiveModel  # imports the registry: only in worker processes

    with _models_lock:
        active = getattr(app, "_pleura_active_model", None)
        if active is None:
            from worker.inference.runtime import configure_torch_threads  # torch: worker processes only

            settings = app.pleura_settings
            configure_torch_threads(settings.torch_threads, getattr(app, "pleura_worker_processes", 1))
            active = app._pleura_active_model = ActiveModel(app.pleura_settings, "radiograph")
    return active.current()


def register_worker_tasks(app: Celery, build_ct_demo: CTDemoBuilder | None = None) -> None:
    """The analysis tasks on ``app``: radiographs, and CT series (``build_ct_demo``: see
    :func:`worker.ct_tasks.register_ct_tasks`)."""

    @app.task(name=ANALYSE_STUDY, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=MAX_RETRIES)
    def analyse_study(
        self: Task, study_uid: str, instances: list[dict[str, str]], options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Analyse the given instances of one study; idempotent (result UIDs are deterministic).

        ``options`` (from :func:`node.dispatch.analysis_options`) say which result objects to
        write; a message without them (sent by an older node) gets every object.

        An unexpected error is retried with a growing delay; after the last try the node is told
        the study failed, with the reason, so it never waits in "queued" for ever.
        """
        # The model is taken once, when the analysis starts, and kept to its end.
        return analyse_and_report(
            self, study_uid, instances, options, lambda *args: _analyser(self.app).analyse(*args)
        )

    from worker.ct_tasks import register_ct_tasks  # the CT queue's task: worker/ct_tasks.py

    register_ct_tasks(app, build_ct_demo)


def analyse_and_report(
    task: Task,
    study_uid: str,
    instances: list[dict[str, str]],
    options: dict[str, Any] | None,
    analyse: Callable[[str, list[dict[str, str]], dict[str, Any] | None], dict[str, Any]],
) -> dict[str, Any]:
    """The body every analysis task shares: say it started, run ``analyse(study_uid, instances,
    options)`` with its files from and to the shared storage when there is one, retry an unexpected
    error with a growing delay (after the last try the node is told the study failed, with the
    reason), and send the summary to the node side."""
    from worker.analysis import failed_summary

    try:  # tell the worklist; a message lost here costs nothing but the word "analysing"
        started = datetime.now(timezone.utc).isoformat()  # the worker's clock, like "analysed_at"
        task.app.send_task(ANALYSIS_STARTED, args=[study_uid, task.request.id, started])
    except Exception as exc:
        log.warning("cannot report the start of an analysis: %s", exc)
    try:
        summary = analyse_with_shared_storage(analyse, task.app.pleura_settings, study_uid, instances, options)
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
