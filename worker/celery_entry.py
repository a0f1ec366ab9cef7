"""`celery -A worker.celery_entry:app worker -Q radiograph`: the analysis worker's app.

On the ``ct`` queue this app finds the CT demo bundle but does not build it (`pleura worker` does,
on first use): run `pleura demo-model` first when the CT demo is the active CT model.
"""

from config.settings import load_settings
from worker.celery_app import make_celery
from worker.tasks import register_worker_tasks

app = make_celery(load_settings())
register_worker_tasks(app)
