"""Starting an analysis worker: the checks before it takes a task, its pool, and Celery's start.

`pleura worker` parses its options and calls :func:`run_worker`; a bundle that cannot be loaded is
refused here (:class:`WorkerStartError`, with the kind and the reason) before Celery starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.errors import PleuraError
from config.settings import Settings
from contract.active import active_bundle_dir, is_ct_demo_dir
from contract.bundle import BundleError, load_bundle
from contract.tasks import RADIOGRAPH_QUEUE, STAT_QUEUE, with_stat_queue
from node.logs import keep_celery_from_logging_setup
from contract.celery_app import make_celery
from config.private_files import make_private_dirs, restrict_umask
from worker.inference.lungs import configured_lung_segmenter
from worker.pool import shutdown_analysis_pools
from worker.tasks import register_worker_tasks, warm_models

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("pleura.worker")

ANALYSIS_KINDS = ("radiograph", "ct")


class WorkerStartError(PleuraError):
    """The worker cannot start: a model bundle it would run is unusable."""

    def __init__(self, kind: str, reason: BundleError) -> None:
        super().__init__(f"({kind}): {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class PoolPolicy:
    """How Celery runs the tasks: ``pool`` (solo, threads or prefork), ``concurrency``, and the
    processes that share the host's CPUs (for torch's thread count)."""

    pool: str
    concurrency: int
    processes: int


def pool_policy(settings: Settings, concurrency: int) -> PoolPolicy:
    """One process: solo, or threads that share forward passes when ``worker_threads`` > 1; more
    processes: prefork (one per GPU)."""
    pool = "solo" if concurrency == 1 else "prefork"
    if concurrency == 1 and settings.worker_threads > 1:  # studies at once, sharing forward passes
        pool, concurrency = "threads", settings.worker_threads
    return PoolPolicy(pool, concurrency, 1 if pool != "prefork" else concurrency)


def check_analysis_pool(settings: Settings, policy: PoolPolicy) -> None:
    """Refuse a process pool under Celery's prefork pool: its processes are daemonic, and a daemonic
    process may not start processes of its own (one line, naming the setting)."""
    if settings.analysis_processes > 0 and policy.pool == "prefork":
        raise WorkerStartError(
            "analysis pool",
            PleuraError(
                f"PLEURA_ANALYSIS_PROCESSES={settings.analysis_processes} needs a worker of one process "
                f"(--concurrency 1), not {policy.concurrency} prefork processes, which cannot start a pool: "
                "run one `pleura worker` per GPU, or set PLEURA_ANALYSIS_PROCESSES=0"
            ),
        )


def queue_kinds(queues: str) -> list[str]:
    """The analysis kinds a comma-separated queue list serves (the STAT queue's are radiographs)."""
    names = with_stat_queue(queues).split(",")
    if STAT_QUEUE in names:
        names.append(RADIOGRAPH_QUEUE)
    return [kind for kind in ANALYSIS_KINDS if kind in names]


def check_bundles(settings: Settings, kinds: list[str]) -> None:
    """Load the active bundle of each kind once, so a broken one stops the worker at start-up; the
    worker follows the registry from then on. The CT demo bundle is built on first use when nothing
    else is active, so it is not checked here."""
    for kind in kinds:
        if kind == "ct" and is_ct_demo_dir(settings, active_bundle_dir(settings, "ct")):
            continue
        try:
            bundle = load_bundle(active_bundle_dir(settings, kind))
        except BundleError as exc:
            raise WorkerStartError(kind, exc) from None
        log.info("%s model: %s", kind, bundle.identity.label)  # a log line (text or JSON)


def check_lung_segmenter(settings: Settings) -> None:
    """Load the lung segmenter PLEURA_LUNG_SEGMENTER_WEIGHTS names, so a wrong file stops the worker
    at start-up (one line) instead of failing its first study."""
    if settings.lung_segmenter_weights is None:
        return
    try:
        segmenter = configured_lung_segmenter(settings)
    except PleuraError as exc:
        raise WorkerStartError("lung segmenter", exc) from None
    log.info("lung fields: %s from %s", segmenter.method, segmenter.source)


def start_worker_ops(settings: Settings, celery_app: Celery, verbose: bool) -> None:
    """Celery logs in our format; /healthz, /readyz, /metrics on PLEURA_WORKER_METRICS_PORT when it
    is set."""
    keep_celery_from_logging_setup(logging.DEBUG if verbose else logging.INFO, settings.log_format)
    if settings.worker_metrics_port:
        from node.ops.server import worker_ops_server  # prometheus client and the HTTP server: only when asked

        make_private_dirs(settings.storage_dir)  # ready before its first study
        worker_ops_server(settings, celery_app, settings.worker_metrics_port).start()


def worker_arguments(settings: Settings, queues: str, policy: PoolPolicy, verbose: bool) -> list[str]:
    """The arguments of Celery's ``worker`` command for this worker."""
    return [
        *(["--quiet"] if settings.log_format == "json" else []),  # no banner: it is plain text
        "worker",
        "-Q",
        with_stat_queue(queues),
        "-P",
        policy.pool,
        "-c",
        str(policy.concurrency),
        "-n",
        f"analyse-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "DEBUG" if verbose else "INFO",
    ]


def run_worker(
    settings: Settings,
    *,
    queues: str | None,
    concurrency: int,
    verbose: bool,
    build_ct_demo: Callable[[Path], Any],
) -> None:
    """Check the bundles, register the tasks and run Celery's worker until it stops.

    ``build_ct_demo(bundle_dir)`` trains the CT demo bundle on first use (training's, given by the
    caller: the worker never imports training).
    """
    # Once, for the whole process and its pool: what libraries create is private too (config/private_files.py).
    restrict_umask()
    queue_list = queues or ",".join(settings.worker_queues)
    policy = pool_policy(settings, concurrency)
    check_analysis_pool(settings, policy)
    check_bundles(settings, queue_kinds(queue_list))
    check_lung_segmenter(settings)
    celery_app = make_celery(settings)
    register_worker_tasks(celery_app, build_ct_demo)
    start_worker_ops(settings, celery_app, verbose)  # JSON logs for Celery too; /healthz when configured
    celery_app.pleura_worker_processes = policy.processes  # torch threads per process
    # Load and warm the models before the first task (worker/tasks.py): a worker takes work only
    # once it can answer fast, and says so in its status report.
    try:
        warm_models(celery_app, queue_kinds(queue_list), prefork=policy.pool == "prefork")
    except BundleError as exc:
        raise WorkerStartError("warm-up", exc) from exc
    try:
        celery_app.worker_main(worker_arguments(settings, queue_list, policy, verbose))
    finally:
        shutdown_analysis_pools()  # the analysis pool's processes end with the worker
