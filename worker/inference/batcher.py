"""Dynamic batching: one forward pass over the images of every analysis waiting for one.

A worker that analyses several studies at once (``worker_threads`` > 1: Celery's threads pool)
gives each of them to the same :class:`ForwardBatcher` of its analyser. Whichever task finds the
networks idle leads: it waits a few milliseconds for more images (never longer than
``max_wait_s``, and not at all once ``max_images`` are waiting), runs one forward pass over what is
there, and hands each task its own rows. Every task then measures and writes its own study's
results, so a task stays one study from message to summary (idempotent, acknowledged late).

One batcher belongs to one analyser, so a batch never mixes models: after a registry reload the
new analyser has a new batcher, and tasks still holding the old analyser batch among themselves.

Hand-written rather than taken from a library: Celery's batching add-on (celery-batches) acknowledges
its requests when they are taken, not when they are done, which the node's reliability needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from node.ops.worker_metrics import FORWARD_IMAGES, FORWARD_PASSES

__all__ = ["ForwardBatcher", "Forward"]

log = logging.getLogger(__name__)

Forward = Callable[[Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray]]
"""Decoded images -> (classifier probabilities (N,), U-Net probability maps (N, H, W))."""


class _Request:
    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self.images = list(images)
        self.done = False
        self.outputs: tuple[np.ndarray, np.ndarray] | None = None
        self.error: BaseException | None = None


class ForwardBatcher:
    """Runs ``forward`` on the images of concurrent callers, at most ``max_images`` at a time.

    :meth:`run` is called by each analysis (from its own thread) and returns that caller's rows,
    in order. A single caller pays at most ``max_wait_s`` of waiting per call.
    """

    def __init__(self, forward: Forward, max_images: int = 8, max_wait_s: float = 0.005) -> None:
        if max_images < 1:
            raise ValueError(f"ForwardBatcher: max_images must be at least 1, got {max_images}")
        self._forward = forward
        self.max_images = max_images
        self.max_wait_s = max(0.0, max_wait_s)
        self._pending: list[_Request] = []
        self._busy = False
        self._condition = threading.Condition()
        self.forward_passes = 0
        """How many forward passes ran (for the log and the tests)."""

    def run(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The network outputs for ``images``, computed in one forward pass with other callers' images."""
        if not images:
            raise ValueError("ForwardBatcher.run: no images")
        request = _Request(images)
        with self._condition:
            self._pending.append(request)
            self._condition.notify_all()
        while True:
            with self._condition:
                while not request.done and self._busy:
                    self._condition.wait()
                if request.done:
                    return self._outcome(request)
                self._busy = True  # this caller leads the next pass
                deadline = time.monotonic() + self.max_wait_s
                while self._waiting_images() < self.max_images:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._condition.wait(left)
                batch = self._take()
            try:
                self._run_batch(batch)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

    def _waiting_images(self) -> int:
        return sum(len(request.images) for request in self._pending)

    def _take(self) -> list[_Request]:
        """The oldest requests that fit in one pass (always at least one)."""
        batch, count = [], 0
        while self._pending and (not batch or count + len(self._pending[0].images) <= self.max_images):
            request = self._pending.pop(0)
            batch.append(request)
            count += len(request.images)
        return batch

    def _run_batch(self, batch: list[_Request]) -> None:
        images = [image for request in batch for image in request.images]
        try:
            probabilities, masks = self._forward(images)
        except BaseException as exc:  # every caller of this pass gets the error, in its own thread
            for request in batch:
                request.error, request.done = exc, True
            return
        self.forward_passes += 1
        FORWARD_PASSES.inc()
        FORWARD_IMAGES.inc(len(images))
        log.info("forward pass: %d images from %d analyses", len(images), len(batch))
        start = 0
        for request in batch:
            end = start + len(request.images)
            request.outputs, request.done = (probabilities[start:end], masks[start:end]), True
            start = end

    @staticmethod
    def _outcome(request: _Request) -> tuple[np.ndarray, np.ndarray]:
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs
