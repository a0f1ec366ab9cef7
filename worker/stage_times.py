"""Where one analysis spent its time: seconds per stage, summed over the study's images.

Each analysis keeps a :class:`StageTimes`; the pool's jobs (worker/image_jobs.py) time their own
work and hand the figures back. At the end the worker logs them in one line per study and adds
them to ``pleura_worker_stage_seconds`` on its ``/metrics`` (node/ops/worker_metrics.py), so that a
site sees which stage holds a flag back, and ``benchmarks/load.py`` can cut each study's time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from node.ops.worker_metrics import STAGE_SECONDS

__all__ = ["STAGES", "StageTimes"]

STAGES = ("read", "decode", "forward", "measure", "SEG", "GSPS", "SC", "SR")
"""In the order the work happens: the header read, decoding, both networks' forward pass, the mask
taken to the source grid and measured, each result object built and durably written."""


class StageTimes:
    """Seconds per stage of one analysis (on CUDA its next batch is decoded in a helper thread:
    :meth:`add` takes a lock)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def merge(self, other: Mapping[str, float]) -> None:
        """Add another's figures (a pool job's :attr:`seconds`)."""
        for stage, seconds in other.items():
            self.add(stage, seconds)

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def text(self) -> str:
        """``read 3, decode 34, … ms``: the stages in their order, in whole milliseconds."""
        order = [stage for stage in STAGES if stage in self.seconds] + sorted(set(self.seconds) - set(STAGES))
        return ", ".join(f"{stage} {1000 * self.seconds[stage]:.0f}" for stage in order) + " ms"

    def observe(self) -> None:
        """Add this analysis's figures to the worker's ``pleura_worker_stage_seconds``."""
        for stage, seconds in self.seconds.items():
            STAGE_SECONDS.labels(stage=stage).observe(seconds)
