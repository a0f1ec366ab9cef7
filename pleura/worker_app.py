"""`celery -A pleura.worker_app:app worker -Q radiograph`: the analysis worker's app, for running
Celery directly instead of `pleura worker`."""

from config.settings import load_settings
from training.ct_demo_model import ensure_ct_demo_bundle
from worker.celery_app import make_celery
from worker.tasks import register_worker_tasks


def build_ct_demo(bundle_dir):
    """The CT demo bundle in ``bundle_dir``, trained there first when it is missing."""
    return ensure_ct_demo_bundle(bundle_dir, progress=False)[0]


app = make_celery(load_settings())
register_worker_tasks(app, build_ct_demo)
