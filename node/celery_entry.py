"""The node's Celery app for the export worker: ``celery -A node.celery_entry:app worker -Q export``.

Settings are read from the environment (``PLEURA_*``, ``PLEURA_CONFIG``) when this module is imported.
"""

from __future__ import annotations

from config.settings import load_settings
from node.progress import register_progress_tasks
from node.tasks import register_node_tasks
from worker.celery_app import make_celery

app = make_celery(load_settings())
tasks = register_node_tasks(app)
register_progress_tasks(app)
