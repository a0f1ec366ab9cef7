"""The Celery application shared by the node (which sends tasks) and the workers (which run them).

The task and queue names are in :mod:`contract.tasks`. This module imports neither torch nor the
task bodies.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import create_engine

from config.private_files import create_private_file, make_private_dirs
from config.settings import Settings, StorageDirError
from contract.tasks import QUEUES, RADIOGRAPH_QUEUE, TASK_ROUTES


class EmbeddedChannel(kombu_sqlalchemy.Channel):
    """kombu's SQLAlchemy channel, whose engine gets none of the transport options: kombu hands
    them all to create_engine(), which refuses ``polling_interval``."""

    def _engine_from_config(self) -> object:
        return create_engine(self.connection.client.hostname)


class EmbeddedTransport(kombu_sqlalchemy.Transport):
    """The embedded broker's transport: kombu's SQLAlchemy transport on a SQLite file, polling
    every ``broker_polling_ms`` (kombu's default is one second, a second per hop)."""

    Channel = EmbeddedChannel


EMBEDDED_TRANSPORT = f"{__name__}:EmbeddedTransport"


def make_celery(settings: Settings, include: list[str] | None = None) -> Celery:
    """A Celery app for these settings: Redis (or any broker URL) if set, else the embedded broker.

    The embedded broker is kombu's SQLAlchemy transport on a SQLite file in the storage directory:
    durable, and needs no server. Its folder and file are made private (0700, 0600) before kombu
    opens it, whatever the umask (config/private_files.py).
    """
    if settings.embedded_broker:
        try:
            make_private_dirs(settings.storage_dir)
            create_private_file(settings.embedded_broker_file)
        except OSError as exc:
            raise StorageDirError.from_os_error(settings.storage_dir, exc) from exc
    broker = settings.celery_broker_url
    if settings.embedded_broker:  # the transport named apart from the URL: sqla+sqlite:///... → sqlite:///...
        broker = broker.removeprefix("sqla+")
    app = Celery("pleura", broker=broker, include=include or [])
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
    if settings.embedded_broker:
        # kombu's virtual transports sleep this long between empty polls (1 s by default): one
        # second of latency per hop between node, workers and export worker. Its idle cost is
        # measured in docs/benchmarks.md.
        app.conf.broker_transport = EMBEDDED_TRANSPORT
        app.conf.broker_transport_options = {"polling_interval": settings.broker_polling_ms / 1000}
    else:
        app.conf.broker_transport_options = {"visibility_timeout": 3600}
    app.pleura_settings = settings  # the tasks read their settings from the app, not from globals
    return app
