"""The Celery application shared by the node (which sends tasks) and the workers (which run them).

Task names are stable strings so the node can send a task without importing the worker's code
(and torch). This module imports neither torch nor the task bodies.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from config.settings import Settings

ANALYSE_STUDY = "pleura.analyse_study"
RECORD_ANALYSIS = "pleura.record_analysis"
DELIVER_RESULT = "pleura.deliver_result"
ANALYSIS_STARTED = "pleura.analysis_started"  # a worker took a study: the worklist shows "analysing"
ANALYSE_SERIES_CT = "pleura.analyse_series_ct"  # one CT series: volume segmentation

RADIOGRAPH_QUEUE = "radiograph"
EXPORT_QUEUE = "export"
CT_QUEUE = "ct"  # its own workers: a long CT series never delays a radiograph

TASK_ROUTES = {
    ANALYSE_STUDY: {"queue": RADIOGRAPH_QUEUE},
    RECORD_ANALYSIS: {"queue": EXPORT_QUEUE},
    DELIVER_RESULT: {"queue": EXPORT_QUEUE},
    ANALYSIS_STARTED: {"queue": EXPORT_QUEUE},
    ANALYSE_SERIES_CT: {"queue": CT_QUEUE},
}


def make_celery(settings: Settings, include: list[str] | None = None) -> Celery:
    """A Celery app for these settings: Redis (or any broker URL) if set, else the embedded broker.

    The embedded broker is kombu's SQLAlchemy transport on a SQLite file in the storage directory:
    durable, and needs no server.
    """
    if settings.embedded_broker:
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("pleura", broker=settings.celery_broker_url, include=include or [])
    app.conf.update(
        task_routes=TASK_ROUTES,
        task_queues=[Queue(RADIOGRAPH_QUEUE), Queue(EXPORT_QUEUE), Queue(CT_QUEUE)],
        task_default_queue=RADIOGRAPH_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # A task is acknowledged only when it has finished, and given back if its worker dies:
        # the tasks are idempotent (deterministic result UIDs), so a redelivery does no harm.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    if not settings.embedded_broker:
        # kombu's SQLAlchemy transport hands its options to create_engine(): Redis only.
        app.conf.broker_transport_options = {"visibility_timeout": 3600}
    app.pleura_settings = settings  # the tasks read their settings from the app, not from globals
    return app
