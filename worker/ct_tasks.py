"""The CT queue's Celery task: analyse one CT series by reference and hand the summary to the node."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery, Task

from contract.active import is_ct_demo_dir
from contract.bundle import Bundle, load_bundle
from worker.celery_app import ANALYSE_SERIES_CT
from worker.tasks import MAX_RETRIES, analyse_and_report

_models_lock = threading.Lock()

CTDemoBuilder = Callable[[Path], Bundle]
"""Makes sure the synthetic CT demo bundle at a directory is there and current (building it when
not) and returns it: ``training.ct_demo_model.ensure_ct_demo_bundle``, given by ``pleura worker``.
The worker only finds bundles; building one is training's."""


def _ct_loader(build_ct_demo: CTDemoBuilder | None) -> Callable[[Any, Path], Any]:
    def load(settings, bundle_dir: Path):
        """The CT analyser of ``bundle_dir``; the CT demo bundle is built first (with
        ``build_ct_demo``, when there is one) when it is the active one and is not there yet."""
        from worker.ct_analysis import SeriesAnalyser  # imports torch: only in worker processes

        if build_ct_demo is not None and is_ct_demo_dir(settings, bundle_dir):
            bundle = build_ct_demo(bundle_dir)
        else:
            bundle = load_bundle(bundle_dir)
        return SeriesAnalyser(settings.storage_dir, bundle, settings.device)

    return load


def ct_analyser(app: Celery, build_ct_demo: CTDemoBuilder | None = None):
    """The CT analyser for the next task: the registry's active CT model, reloaded when it changes
    (worker/active_model.py), as for radiographs. The task keeps this reference until it ends."""
    from worker.active_model import ActiveModel

    with _models_lock:
        active = getattr(app, "_pleura_ct_model", None)
        if active is None:
            active = app._pleura_ct_model = ActiveModel(app.pleura_settings, "ct", loader=_ct_loader(build_ct_demo))
    return active.current()


def register_ct_tasks(app: Celery, build_ct_demo: CTDemoBuilder | None = None) -> None:
    """The CT task on ``app``. With ``build_ct_demo``, a missing or outdated CT demo bundle is built
    on first use when it is the active CT model; without, it must have been built already
    (`pleura demo-model`), and the task fails with the loader's reason until it is."""

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
            lambda study, slices, chosen: ct_analyser(self.app, build_ct_demo).analyse(study, series_uid, slices, chosen),
        )
