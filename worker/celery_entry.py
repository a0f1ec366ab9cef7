"""`celery -A worker.celery_entry:app worker -Q radiograph`: the analysis worker's app."""

from config.settings import load_settings
from worker.celery_app import make_celery
from worker.tasks import register_worker_tasks

app = make_celery(load_settings())
register_worker_tasks(app)
