"""Prometheus metrics, all named ``pleura_*``.

Where each comes from, so that what workers on other hosts do reaches the node's ``/metrics``:

- instances received: counted by the node's SCP as it stores them (this process);
- queue depth per queue: asked of the broker at each scrape (Redis list lengths, or the
  embedded broker's table), so every queue of the Celery app shows, whoever consumes it;
- analyses, analysis time, time to flag: read from the ledger, where the node side records
  every worker's summary. Analysis time is the worker's "analysed_at" minus its
  "pleura.analysis_started" time, both on the worker's clock; time to flag is the flag's time
  minus the study's first received instance (as the worklist shows it). They are observed once
  per analysis, from the node's start on, like any in-process counter;
- deliveries, failed delivery attempts and deliveries given up: totals of the ledger's outbox;
- the active model: :func:`active_models`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from config.settings import Settings
from contract.active import active_bundle_dir
from contract.bundle import BundleError, load_bundle
from node.dispatch import queue_depths
from node.ledger import AnalysisStart, Ledger, OutboxEntry, OutboxStatus, Study, StudyStatus, utcnow
from node.ops.worker_metrics import FORWARD_IMAGES, FORWARD_PASSES, STAGE_SECONDS

log = logging.getLogger(__name__)

INSTANCES_RECEIVED = Counter(
    "pleura_instances_received", "Instances stored by the node's SCP (answered 0x0000)", registry=None
)
IDENTITY_CONFLICTS = Counter(
    "pleura_identity_conflicts",
    "Instances refused because their SOP Instance or Study UID is held for another study or patient",
    registry=None,
)

ANALYSIS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
TIME_TO_FLAG_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


def active_models(settings: Settings) -> list[dict[str, str]]:
    """The model bundles in use, as ``{"name", "version", "kind"}``: the one place that says so.

    For each kind of input, the bundle the registry holds active (or the fixed bundle that
    ``PLEURA_MODEL_BUNDLE_DIR`` names): the one the workers load before their next task.
    """
    models = []
    for kind in ("radiograph", "ct"):
        try:
            manifest = load_bundle(active_bundle_dir(settings, kind)).manifest
        except BundleError:  # nothing active for this kind
            continue
        if manifest.kind == kind:
            models.append({"name": manifest.name, "version": manifest.version, "kind": manifest.kind})
    return models


class ModelCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "pleura_model_active", "The model bundle in use (value 1), by name, version and kind",
            labels=["name", "version", "kind"],
        )
        for model in active_models(self.settings):
            gauge.add_metric([model["name"], model["version"], model["kind"]], 1)
        yield gauge


class QueueCollector(Collector):
    def __init__(self, celery_app: Celery) -> None:
        self.celery_app = celery_app

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pleura_broker_up", "1 when the broker answered this scrape")
        depth = GaugeMetricFamily("pleura_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
        try:
            depths = queue_depths(self.celery_app)
        except Exception as exc:
            log.warning("metrics: cannot read queue depths from the broker: %s", exc)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for name, count in sorted(depths.items()):
                depth.add_metric([name], count)
        yield up
        yield depth


def _outcome(status: str, flagged: bool | None) -> str:
    if status in (StudyStatus.FAILED, StudyStatus.NOT_ANALYSED):
        return str(status)
    return "flagged" if flagged else "not_flagged"


class LedgerCollector(Collector):
    """Analyses and deliveries as the ledger records them (see the module's docstring)."""

    # Worker clocks may lag the node's, and summaries may be recorded late: look this far back,
    # and remember what was already observed.
    LOOKBACK = timedelta(minutes=30)

    def __init__(self, ledger: Ledger, *, since: datetime | None = None) -> None:
        self.ledger = ledger
        self._since = (since or utcnow()) - self.LOOKBACK
        self._seen: dict[tuple[str, datetime], None] = {}
        self._lock = threading.Lock()
        self.analyses = Counter(
            "pleura_analyses", "Analyses recorded, by outcome", ["outcome"], registry=None
        )
        self.analysis_seconds = Histogram(
            "pleura_analysis_seconds", "Time a worker took to analyse a study (its own clock)",
            buckets=ANALYSIS_BUCKETS, registry=None,
        )
        self.time_to_flag = Histogram(
            "pleura_time_to_flag_seconds", "First instance received to flag raised, per flagged study",
            buckets=TIME_TO_FLAG_BUCKETS, registry=None,
        )

    def _catch_up(self) -> None:
        query = (
            select(Study.study_uid, Study.status, Study.flagged, Study.first_received_at, Study.analysed_at,
                   AnalysisStart.started_at)
            .outerjoin(AnalysisStart, AnalysisStart.study_uid == Study.study_uid)
            .where(Study.analysed_at >= self._since)
        )
        with self.ledger.reading() as session:
            rows = session.execute(query).all()
        latest = self._since
        for study_uid, status, flagged, first_received, analysed, started in rows:
            latest = max(latest, analysed)
            if (study_uid, analysed) in self._seen:
                continue
            self._seen[(study_uid, analysed)] = None
            self.analyses.labels(_outcome(status, flagged)).inc()
            if started is not None and started <= analysed:
                self.analysis_seconds.observe((analysed - started).total_seconds())
            if flagged:
                self.time_to_flag.observe(max(0.0, (analysed - first_received).total_seconds()))
        self._since = max(self._since, latest - self.LOOKBACK)
        self._seen = {key: None for key in self._seen if key[1] >= self._since}

    def _deliveries(self) -> list[Metric]:
        query = select(OutboxEntry.destination, OutboxEntry.status, func.count(), func.sum(OutboxEntry.attempts)).group_by(
            OutboxEntry.destination, OutboxEntry.status
        )
        with self.ledger.reading() as session:
            rows = session.execute(query).all()
        sent = CounterMetricFamily("pleura_deliveries", "Results delivered, by destination", labels=["destination"])
        failures = CounterMetricFamily(
            "pleura_delivery_failures", "Delivery attempts that failed, by destination", labels=["destination"]
        )
        given_up = CounterMetricFamily(
            "pleura_deliveries_given_up", "Results whose delivery was given up, by destination", labels=["destination"]
        )
        totals: dict[str, list[int]] = {}  # destination -> [sent, attempts, given up]
        for destination, status, count, attempts in rows:
            entry = totals.setdefault(destination, [0, 0, 0])
            entry[1] += int(attempts or 0)
            if status == OutboxStatus.SENT:
                entry[0] += int(count)
            elif status == OutboxStatus.FAILED:
                entry[2] += int(count)
        for destination, (ok, attempts, failed) in sorted(totals.items()):
            sent.add_metric([destination], ok)
            failures.add_metric([destination], max(0, attempts - ok))
            given_up.add_metric([destination], failed)
        return [sent, failures, given_up]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                self._catch_up()
                deliveries = self._deliveries()
            except Exception as exc:
                log.warning("metrics: cannot read the ledger: %s", exc)
                deliveries = []
        yield from self.analyses.collect()
        yield from self.analysis_seconds.collect()
        yield from self.time_to_flag.collect()
        yield from deliveries


def node_registry(settings: Settings, ledger: Ledger, celery_app: Celery) -> CollectorRegistry:
    """The node's metrics: everything above."""
    registry = CollectorRegistry()
    for collector in (
        INSTANCES_RECEIVED, IDENTITY_CONFLICTS, QueueCollector(celery_app), LedgerCollector(ledger), ModelCollector(settings)
    ):
        registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def worker_registry(settings: Settings, celery_app: Celery) -> CollectorRegistry:
    """A worker's (or export worker's) own metrics: the queues it sees, its model, its process."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(celery_app))
    registry.register(ModelCollector(settings))
    registry.register(FORWARD_PASSES)
    registry.register(FORWARD_IMAGES)
    registry.register(STAGE_SECONDS)
    ProcessCollector(registry=registry)
    return registry
