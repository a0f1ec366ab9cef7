"""The counters a worker process keeps itself (shown on the worker's ``/metrics``).

Kept apart from :mod:`node.ops.metrics`, whose collectors read the ledger: a worker counts its
forward passes without loading the node's database models.
"""

from __future__ import annotations

from prometheus_client import Counter

# Counted by a worker's batcher (worker/inference/batcher.py): images / passes = the batch size
# dynamic batching achieves.
FORWARD_PASSES = Counter("pleura_worker_forward_passes", "Forward passes of the networks in this worker", registry=None)
FORWARD_IMAGES = Counter("pleura_worker_forward_images", "Images through the networks in this worker", registry=None)
