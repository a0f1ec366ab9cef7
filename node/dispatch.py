"""Sending a settled study to the workers, by task name and by reference.

The node never imports the worker's code (or torch): the task is named by its stable string and
carries the study UID and the storage keys of its instances, never pixel data.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from celery import Celery

from worker.celery_app import ANALYSE_STUDY

Dispatcher = Callable[[str, list[dict[str, str]]], str]
"""dispatch(study_uid, instances) -> task id; raises when the broker cannot take the task."""

# Fail within seconds when the broker is down; the settle loop tries again next round.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def dispatch_analysis(celery_app: Celery, study_uid: str, instances: list[dict[str, str]]) -> str:
    """Send ANALYSE_STUDY for `study_uid` with ``[{"sop_instance_uid", "key"}, ...]``; returns the task id."""
    result = celery_app.send_task(
        ANALYSE_STUDY, args=[study_uid, instances], retry=True, retry_policy=PUBLISH_RETRY_POLICY
    )
    return str(result.id)


def make_dispatcher(celery_app: Celery) -> Dispatcher:
    return partial(dispatch_analysis, celery_app)
