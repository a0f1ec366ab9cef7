"""`celery -A pleura.worker_app:app worker -Q radiograph`: the analysis worker's app, for running
Celery directly instead of `pleura worker`."""

from pleura.installation import exit_if_shadowed

exit_if_shadowed()  # before any other project module: a shadowing one fails here, in one line

from config.settings import load_settings  # noqa: E402
from training.ct_demo_model import ensure_ct_demo_bundle  # noqa: E402
from contract.celery_app import make_celery  # noqa: E402
from worker.tasks import register_worker_tasks  # noqa: E402


def build_ct_demo(bundle_dir):
    """The CT demo bundle in ``bundle_dir``, trained there first when it is missing."""
    return ensure_ct_demo_bundle(bundle_dir, progress=False)[0]


app = make_celery(load_settings())
register_worker_tasks(app, build_ct_demo)
