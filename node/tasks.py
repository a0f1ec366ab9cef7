"""Node-side Celery tasks on the export queue: record a worker's analysis, deliver its results.

Both are idempotent: a redelivered RECORD_ANALYSIS creates no second outbox row, and a DELIVER_RESULT
for a row that is already sent (or not due) does nothing. Settings come from
``app.pleura_settings`` (set by :func:`contract.celery_app.make_celery`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from config.settings import Settings
from node.export import deliver_outbox_entry
from node.ledger import Ledger
from node.privacy import ref
from node.shared_storage import SharedStorageError, fetch_results
from node.storage import InstanceStore
from contract.tasks import DELIVER_RESULT, RECORD_ANALYSIS

log = logging.getLogger(__name__)


@dataclass
class NodeContext:
    """What the node tasks share within one process: settings, ledger, instance store."""

    settings: Settings
    ledger: Ledger
    store: InstanceStore


@dataclass(frozen=True)
class NodeTasks:
    record_analysis: Task
    deliver_result: Task


_context_lock = threading.Lock()


def node_context(app: Celery) -> NodeContext:
    """The app's node context, opened on first use (in the worker process, not at import)."""
    with _context_lock:
        context: NodeContext | None = getattr(app, "pleura_node_context", None)
        if context is None:
            settings: Settings | None = getattr(app, "pleura_settings", None)
            if settings is None:
                raise RuntimeError(
                    "this Celery app has no pleura_settings; build it with contract.celery_app.make_celery"
                )
            context = NodeContext(settings, Ledger(settings.ledger_url), InstanceStore(settings.storage_dir))
            app.pleura_node_context = context
        return context


def register_node_tasks(app: Celery) -> NodeTasks:
    """Define RECORD_ANALYSIS and DELIVER_RESULT on `app`."""

    @app.task(
        name=RECORD_ANALYSIS,
        bind=True,
        # The ledger may be briefly locked or unreachable: the summary must not be lost.
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        retry_backoff_max=300,
        max_retries=20,
    )
    def record_analysis(self: Task, summary: dict[str, Any]) -> dict[str, Any]:
        """Record the worker's summary and create the outbox rows; send the reports (SR) at once,
        in this task, and enqueue the delivery of the other objects. A report that cannot be sent
        now is retried from the queue; should this process die before sending it, the outbox
        sweeper finds the pending row (node/service.py)."""
        context = node_context(app)
        try:  # many hosts: the worker's result files, from the shared storage into ours
            fetch_results(context.settings, context.store, summary)
        except SharedStorageError as exc:
            log.warning("cannot fetch the results of an analysis yet: %s", exc)
            raise self.retry(exc=exc, countdown=min(300, 5 * 2**self.request.retries)) from exc
        result_uids = context.ledger.record_analysis(summary)
        study_uid = str(summary["study_uid"])
        receives = {destination.label: destination.objects for destination in context.settings.destinations}
        pending = context.ledger.create_outbox(study_uid, receives) if receives else []
        reports, others = reports_first(context.ledger, study_uid, pending)
        # The reports, which carry the flag, are sent from here at once: no broker hop, no poll.
        # The other objects then go through the queue (the export worker's other threads take them).
        for outbox_id in reports:
            outcome = deliver_outbox_entry(context.ledger, context.store, context.settings, outbox_id)
            if outcome.state == "retry":  # the queue keeps trying, with the ledger's backoff
                deliver_result.apply_async(args=[outbox_id], countdown=outcome.retry_in)
        for outbox_id in others:
            deliver_result.apply_async(args=[outbox_id])
        study = context.ledger.study_status(study_uid)
        log.info(
            "recorded analysis of study %s: %s, %d result(s), %d delivery(ies) enqueued",
            ref(study_uid),
            study["status"] if study else "?",
            len(result_uids),
            len(pending),
        )
        # Celery logs what a task returns: references, not UIDs (see node/privacy.py).
        return {"study": ref(study_uid), "results": len(result_uids), "outbox_ids": pending}

    @app.task(name=DELIVER_RESULT, bind=True, max_retries=None)
    def deliver_result(self: Task, outbox_id: int) -> dict[str, Any]:
        """One delivery attempt of an outbox row; retried with the ledger's backoff until it is
        sent or the destination's max_attempts is reached."""
        context = node_context(app)
        outcome = deliver_outbox_entry(context.ledger, context.store, context.settings, int(outbox_id))
        if outcome.state == "retry":
            raise self.retry(countdown=outcome.retry_in, max_retries=None)
        return asdict(outcome)

    return NodeTasks(record_analysis=record_analysis, deliver_result=deliver_result)


def reports_first(ledger: Ledger, study_uid: str, outbox_ids: list[int]) -> tuple[list[int], list[int]]:
    """``outbox_ids`` (rows of the study ``study_uid``) split into the SR rows (the reports, which
    carry the flag) and the rest, in one read of the study's outbox."""
    reports = {row.id for row in ledger.list_outbox(study_uid) if row.result_kind == "SR"}
    return [i for i in outbox_ids if i in reports], [i for i in outbox_ids if i not in reports]
