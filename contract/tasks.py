"""The names of the Celery tasks and queues that the node and the workers share.

Task names are stable strings, so the node can send a task without importing the worker's code
(and torch), and a worker can send the node's tasks without importing the node. This module
imports nothing of either.
"""

from __future__ import annotations

ANALYSE_STUDY = "pleura.analyse_study"
RECORD_ANALYSIS = "pleura.record_analysis"
DELIVER_RESULT = "pleura.deliver_result"
ANALYSIS_STARTED = "pleura.analysis_started"  # a worker took a study: the worklist shows "analysing"
ANALYSE_SERIES_CT = "pleura.analyse_series_ct"  # one CT series: volume segmentation
ANALYSIS_HEARTBEAT = "pleura.analysis_heartbeat"  # a running analysis is alive: it keeps its lease

RADIOGRAPH_QUEUE = "radiograph"
EXPORT_QUEUE = "export"
CT_QUEUE = "ct"  # its own workers: a long CT series never delays a radiograph
STAT_QUEUE = "stat"  # urgent radiograph studies: every radiograph worker consumes it, listed first

QUEUES = (STAT_QUEUE, RADIOGRAPH_QUEUE, EXPORT_QUEUE, CT_QUEUE)

TASK_ROUTES = {
    ANALYSE_STUDY: {"queue": RADIOGRAPH_QUEUE},
    RECORD_ANALYSIS: {"queue": EXPORT_QUEUE},
    DELIVER_RESULT: {"queue": EXPORT_QUEUE},
    ANALYSIS_STARTED: {"queue": EXPORT_QUEUE},
    ANALYSIS_HEARTBEAT: {"queue": EXPORT_QUEUE},
    ANALYSE_SERIES_CT: {"queue": CT_QUEUE},
}


def with_stat_queue(queues: str) -> str:
    """A worker's comma-separated queue list with the STAT queue first wherever it serves
    radiographs, so an urgent study never waits behind the radiograph queue's backlog."""
    names = [name for name in queues.split(",") if name and name != STAT_QUEUE]
    if RADIOGRAPH_QUEUE in names or STAT_QUEUE in queues.split(","):
        names.insert(0, STAT_QUEUE)
    return ",".join(names)
