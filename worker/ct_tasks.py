"""The CT queue's Celery task: analyse one CT series by reference and hand the summary to the node."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from celery import Celery, Task

from worker.celery_app import ANALYSE_SERIES_CT
from worker.tasks import MAX_RETRIES, analyse_and_report

_models_lock = threading.Lock()


def _load_ct_analyser(settings, bundle_dir: Path):
    """The CT analyser of ``bundle_dir``; the CT demo bundle is built first when it is the active
    one and is not there yet."""
    from contract.bundle import load_bundle
    from contract.active import is_ct_demo_dir
    from worker.ct_analysis import SeriesAnalyser  # imports torch: only in worker processes

    if is_ct_demo_dir(settings, bundle_dir):
        from training.ct_demo_model import ensure_ct_demo_bundle

        bundle, _ = ensure_ct_demo_bundle(bundle_dir, progress=False)
    else:
        bundle = load_bundle(bundle_dir)
    return SeriesAnalyser(settings.storage_dir, bundle, settings.device)


def ct_analyser(app: Celery):
    """The CT analyser for the next task: the registry's active CT model, reloaded when it changes
    (worker/active_model.py), as for radiographs. The task keeps this reference until it ends."""
    from worker.active_model import ActiveModel

    with _models_lock:
        active = getattr(app, "_pleura_ct_model", None)
        if active is None:
            active = app._pleura_ct_model = ActiveModel(app.pleura_settings, "ct", loader=_load_ct_analyser)
    return active.current()


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
        # The model is taken once, when the analysis starts, and kept to its end.
        return analyse_and_report(
            self, study_uid, instances, options,
            lambda study, slices, chosen: ct_analyser(self.app).analyse(study, series_uid, slices, chosen),
        )
