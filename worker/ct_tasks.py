"""The CT queue's Celery task: analyse one CT series by reference and hand the summary to the node."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery, Task

from contract.active import is_ct_demo_dir
from contract.bundle import load_bundle
from contract.tasks import ANALYSE_SERIES_CT
from worker.task_body import MAX_RETRIES, analyse_and_report
from worker.active_model import ActiveModel

_models_lock = threading.Lock()


def _ct_loader(build_demo: Callable[[Path], Any] | None):
    """Loads the CT analyser of a bundle directory; the CT demo bundle is built first (by
    ``build_demo``, given by the command that starts the worker) when it is the active one and
    is not there yet."""

    def load(settings, bundle_dir: Path):
        from worker.ct_analysis import SeriesAnalyser  # imports torch: only in worker processes

        if build_demo is not None and is_ct_demo_dir(settings, bundle_dir):
            bundle = build_demo(bundle_dir)
        else:
            bundle = load_bundle(bundle_dir)
        return SeriesAnalyser(settings.storage_dir, bundle, settings.device)

    return load


def ct_model(app: Celery):
    """This process's :class:`~worker.active_model.ActiveModel` for CT (made on first use)."""
    with _models_lock:
        active = getattr(app, "_pleura_ct_model", None)
        if active is None:
            loader = _ct_loader(getattr(app, "pleura_ct_demo_builder", None))
            active = app._pleura_ct_model = ActiveModel(app.pleura_settings, "ct", loader=loader)
    return active


def ct_analyser(app: Celery):
    """The CT analyser for the next task: the registry's active CT model, reloaded when it changes
    (worker/active_model.py), as for radiographs. The task keeps this reference until it ends."""
    return ct_model(app).current()


def register_ct_tasks(app: Celery, build_ct_demo: Callable[[Path], Any] | None = None) -> None:
    """The CT task; ``build_ct_demo(bundle_dir)`` builds the CT demo bundle on first use and
    returns it (training.ct_demo_model; without it the demo bundle must already be there)."""
    app.pleura_ct_demo_builder = build_ct_demo

    @app.task(name=ANALYSE_SERIES_CT, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=MAX_RETRIES)
    def analyse_series_ct(
        self: Task,
        study_uid: str,
        series_instance_uid: str,
        instances: list[dict[str, str]],
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Analyse every slice of one CT series; idempotent (result UIDs are deterministic).
        ``options``: :class:`~contract.messages.AnalysisOptions` in their wire form."""
        # The model is taken once, when the analysis starts, and kept to its end.
        return analyse_and_report(
            self, study_uid, instances, options,
            lambda study, slices, chosen: ct_analyser(self.app).analyse(study, series_instance_uid, slices, chosen),
        )
