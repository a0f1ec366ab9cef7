"""Sending a settled study to the workers, by task name and by reference.

The node never imports the worker's code (or torch): the task is named by its stable string and
carries the study UID, the storage keys of its instances and the analysis options (which result
objects to write, whether to draw the heat map), never pixel data.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from celery import Celery

from config.settings import Settings
from node.routing import route_instances
from contract.messages import AnalysisOptions
from contract.tasks import ANALYSE_SERIES_CT, ANALYSE_STUDY, CT_QUEUE, EXPORT_QUEUE, RADIOGRAPH_QUEUE, STAT_QUEUE

Dispatcher = Callable[..., str]
"""dispatch(study_uid, instances[, extra_options]) -> task id; raises when the broker cannot take
the task. ``extra_options`` (a re-analysis: ``supersedes``) go with the :func:`analysis_options`."""

# Fail within seconds when the broker is down; the settle loop tries again next round.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def analysis_options(settings: Settings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's :class:`~contract.messages.AnalysisOptions` in their wire form: what the worker
    needs to know of the node's settings (the result objects some destination receives, whether
    the secondary capture carries the heat map, how often a running analysis says it is alive: a
    quarter of the lease, node/ledger/leases.py), with ``extra`` (a re-analysis's ``supersedes``, a
    lapsed study's ``not_analysed_reason``) on top; raises :class:`~contract.messages.MessageError`
    naming a field that does not fit."""
    return AnalysisOptions.from_message({
        "objects": settings.result_objects,
        "sc_heatmap": settings.sc_heatmap,
        "heartbeat_seconds": settings.analysis_lease_seconds / 4,
        **(extra or {}),
    }).to_message()


def dispatch_analysis(
    celery_app: Celery, study_uid: str, instances: list[dict[str, str]], options: dict[str, Any] | None = None
) -> str:
    """Send ANALYSE_STUDY for `study_uid` with its instances (:class:`~contract.messages.InstanceRef`
    in their wire form) and the
    :func:`analysis_options` of the app's settings, updated with ``options``, and ANALYSE_SERIES_CT per CT
    series (:mod:`node.routing`); returns the task id (the radiograph task's when there is one).
    An urgent study's radiograph task (``options["urgent"]``) goes to the STAT queue."""
    extra = dict(options or {})
    queue = STAT_QUEUE if extra.pop("urgent", False) else RADIOGRAPH_QUEUE
    options = analysis_options(celery_app.pleura_settings, extra)
    routed = route_instances(instances)  # CT series go to their own queue, one task per series
    task_ids = []
    for series_instance_uid, slices in routed.ct_series.items():
        result = celery_app.send_task(
            ANALYSE_SERIES_CT, args=[study_uid, series_instance_uid, slices, options], retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
        task_ids.append(str(result.id))
    if routed.radiograph:
        result = celery_app.send_task(
            ANALYSE_STUDY, args=[study_uid, routed.radiograph, options], queue=queue, retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
        task_ids.insert(0, str(result.id))
    return task_ids[0]


def make_dispatcher(celery_app: Celery) -> Dispatcher:
    return partial(dispatch_analysis, celery_app)


def queue_depths(celery_app: Celery) -> dict[str, int]:
    """Messages waiting in each of the app's queues; raises when the broker cannot be reached."""
    names = [queue.name for queue in celery_app.conf.task_queues or []]
    depths: dict[str, int] = {}
    with celery_app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
        channel = connection.default_channel
        for name in names:
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except connection.channel_errors:
                depths[name] = 0  # never declared: nothing was ever sent to it
    return depths


def analysis_tasks_waiting(celery_app: Celery) -> bool:
    """Whether the broker holds analysis tasks no worker has taken (the STAT, radiograph and CT queues);
    True when the broker cannot tell, so that nothing is dispatched twice on a guess."""
    return _messages_waiting(celery_app, (STAT_QUEUE, RADIOGRAPH_QUEUE, CT_QUEUE))


def export_tasks_waiting(celery_app: Celery) -> bool:
    """Whether the export queue (summaries, heartbeats, deliveries) holds messages not yet taken;
    True when the broker cannot tell."""
    return _messages_waiting(celery_app, (EXPORT_QUEUE,))


def _messages_waiting(celery_app: Celery, queues: tuple[str, ...]) -> bool:
    try:
        depths = queue_depths(celery_app)
    except Exception:  # the broker is unreachable: a dispatch would fail now anyway
        return True
    return any(depths.get(queue, 0) > 0 for queue in queues)


def revoke_analysis(celery_app: Celery, task_id: str | None) -> None:
    """Best effort: tell the running workers to drop ``task_id`` should its message come back (a
    Redis broker returns a killed worker's unacknowledged message after its visibility timeout).
    The embedded broker cannot broadcast, and keeps no such message. A task run anyway is
    harmless: the same model on the same images writes the same objects."""
    if not task_id or celery_app.pleura_settings.embedded_broker:
        return
    try:
        celery_app.control.revoke(task_id)
    except Exception:  # the broker is down: the message, if it returns, is analysed again
        pass
