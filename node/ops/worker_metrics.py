"""The counters a worker process keeps itself (shown on the worker's ``/metrics``).

Kept apart from :mod:`node.ops.metrics`, whose collectors read the ledger: a worker counts its
forward passes without loading the node's database models.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Counted by a worker's batcher (worker/inference/batcher.py): images / passes = the batch size
# dynamic batching achieves.
FORWARD_PASSES = Counter("pleura_worker_forward_passes", "Forward passes of the networks in this worker", registry=None)
FORWARD_IMAGES = Counter("pleura_worker_forward_images", "Images through the networks in this worker", registry=None)

# Per analysed study, the seconds each stage took (worker/stage_times.py): decoding, the forward
# pass, measuring, each result object, the report. A pool process's work counts in its stage.
STAGE_SECONDS = Histogram(
    "pleura_worker_stage_seconds", "Seconds an analysis spent in each stage, per study", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0), registry=None,
)
