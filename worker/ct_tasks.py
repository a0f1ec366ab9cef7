"""The CT queue's Celery task: analyse one CT series by reference and hand the summary to the node."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, Task

from worker.bundles import active_bundle_dir, is_default_bundle_dir
from worker.celery_app import ANALYSE_SERIES_CT
from worker.tasks import MAX_RETRIES, analyse_and_report

_analyser_lock = threading.Lock()


def ct_analyser(app: Celery):
    """One loaded CT model per worker process, built on first use (the CT demo bundle is built
    first when no bundle is configured and none is there yet)."""
    from training.bundle import load_bundle
    from worker.ct_analysis import SeriesAnalyser  # imports torch: only in worker processes

    with _analyser_lock:
        analyser = getattr(app, "_pleura_ct_analyser", None)
        if analyser is None:
            settings = app.pleura_settings
            bundle_dir = active_bundle_dir(settings, "ct")
            if is_default_bundle_dir(settings, "ct"):
                from training.ct_demo_model import ensure_ct_demo_bundle

                bundle, _ = ensure_ct_demo_bundle(bundle_dir, progress=False)
            else:
                bundle = load_bundle(bundle_dir)
            analyser = SeriesAnalyser(settings.storage_dir, bundle, settings.device)
            app._pleura_ct_analyser = analyser
        return analyser


def register_ct_tasks(app: Celery) -> None:
    @app.task(name=ANALYSE_SERIES_CT, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=MAX_RETRIES)
    def analyse_series_ct(
        self: Task,
        study_uid: str,
        series_uid: str,
        instances: list[dict[str, str]],
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Analyse every slice of one CT series; idempotent (result UIDs are deterministic)."""
        return analyse_and_report(
            self, study_uid, instances, lambda: ct_analyser(self.app).analyse(study_uid, series_uid, instances, options)
        )
