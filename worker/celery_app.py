"""The Celery application shared by the node (which sends tasks) and the workers (which run them).

The task and queue names are in :mod:`contract.tasks`. This module imports neither torch nor the
task bodies.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from config.settings import Settings
from contract.tasks import QUEUES, RADIOGRAPH_QUEUE, TASK_ROUTES
from node.storage import StorageDirError


def make_celery(settings: Settings, include: list[str] | None = None) -> Celery:
    """A Celery app for these settings: Redis (or any broker URL) if set, else the embedded broker.

    The embedded broker is kombu's SQLAlchemy transport on a SQLite file in the storage directory:
    durable, and needs no server.
    """
    if settings.embedded_broker:
        try:
            settings.storage_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageDirError.from_os_error(settings.storage_dir, exc) from exc
    app = Celery("pleura", broker=settings.celery_broker_url, include=include or [])
    app.conf.update(
        task_routes=TASK_ROUTES,
        task_queues=[Queue(name) for name in QUEUES],
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
