"""The worker's Celery task: analyse a study by reference and hand the summary to the node side."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery, Task

from contract.tasks import ANALYSE_STUDY
from worker.ct_tasks import ct_model, register_ct_tasks
from worker.task_body import MAX_RETRIES, analyse_and_report
from worker.active_model import ActiveModel

_models_lock = threading.Lock()


def radiograph_model(app: Celery):
    """This process's :class:`~worker.active_model.ActiveModel` for radiographs (made on first use)."""
    with _models_lock:
        active = getattr(app, "_pleura_active_model", None)
        if active is None:
            from worker.inference.runtime import configure_torch_threads  # torch: worker processes only

            settings = app.pleura_settings
            configure_torch_threads(settings.torch_threads, getattr(app, "pleura_worker_processes", 1))
            active = app._pleura_active_model = ActiveModel(app.pleura_settings, "radiograph")
    return active


def _analyser(app: Celery):
    """The analyser for the next task: the registry's active radiograph model, reloaded when it
    changes (worker/active_model.py). The task keeps this reference until it ends."""
    return radiograph_model(app).current()


def warm_models(app: Celery, kinds: list[str], *, prefork: bool = False) -> None:
    """Load and warm the active model of each kind (``radiograph``, ``ct``) before the worker takes
    a task, then follow the registry every ``model_poll_seconds`` (worker/active_model.py).

    Called by `pleura worker` before it starts consuming. With the prefork pool the models live in
    the pool's processes: each warms its own as it starts (Celery's ``worker_process_init``), and
    Celery waits for it (``worker_proc_alive_timeout``) before giving it a task.
    """
    if prefork:
        from celery.signals import worker_process_init

        app.conf.worker_proc_alive_timeout = max(float(app.conf.worker_proc_alive_timeout or 0), WARM_TIMEOUT_SECONDS)
        worker_process_init.connect(lambda **_: warm_models(app, kinds), weak=False)
        return
    interval = app.pleura_settings.model_poll_seconds
    for kind in kinds:
        active = radiograph_model(app) if kind == "radiograph" else ct_model(app)
        active.warm()
        if interval > 0:
            active.follow(interval)


WARM_TIMEOUT_SECONDS = 3600.0
"""How long a prefork pool process may take to warm its models before Celery gives up on it."""


def register_worker_tasks(app: Celery, build_ct_demo: Callable[[Path], Any] | None = None) -> None:
    """The analysis tasks; ``build_ct_demo``: see :func:`worker.ct_tasks.register_ct_tasks`."""

    @app.task(name=ANALYSE_STUDY, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=MAX_RETRIES)
    def analyse_study(
        self: Task, study_uid: str, instances: list[dict[str, str]], options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Analyse the given instances of one study; idempotent (result UIDs are deterministic).

        ``options`` (:class:`~contract.messages.AnalysisOptions` in their wire form, from
        :func:`node.dispatch.analysis_options`) say which result objects to write; a message
        without them (sent by an older node) gets every object.

        An unexpected error is retried with a growing delay; after the last try the node is told
        the study failed, with the reason, so it never waits in "queued" for ever.
        """
        # The model is taken once, when the analysis starts, and kept to its end.
        return analyse_and_report(
            self, study_uid, instances, options, lambda *args: _analyser(self.app).analyse(*args)
        )

    register_ct_tasks(app, build_ct_demo)  # the CT queue's task: worker/ct_tasks.py

