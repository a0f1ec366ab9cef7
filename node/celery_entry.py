"""The node's Celery app for the export worker: ``celery -A node.celery_entry:app worker -Q export``.

Settings are read from the environment (``PLEURA_*``, ``PLEURA_CONFIG``) when this module is imported.
"""

from __future__ import annotations

import logging

from config.settings import load_settings
from node.logs import configure_logging, keep_celery_from_logging_setup
from node.progress import register_progress_tasks
from node.tasks import register_node_tasks
from contract.celery_app import make_celery

settings = load_settings()
# The node's format (text or JSON) from the start, so that Celery's own warnings use it too.
configure_logging(logging.INFO, settings.log_format)
keep_celery_from_logging_setup(logging.INFO, settings.log_format)
app = make_celery(settings)
tasks = register_node_tasks(app)
register_progress_tasks(app)
