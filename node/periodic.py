"""A background thread that calls `run_once()` every `interval_seconds` until stopped, and sooner
when woken (:meth:`PeriodicTask.wake`): an event, not the next tick, starts the round."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

COALESCE_SECONDS = 0.01
"""Wake-ups due this close together are answered by one round."""


class PeriodicTask:
    """Base for the node's loops; a failing round is logged and the next one runs as usual."""

    thread_name = "pleura-periodic"
    run_at_start = True

    def __init__(self, interval_seconds: float) -> None:
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._woken = threading.Event()
        self._lock = threading.Lock()
        # time.monotonic() of every round asked for, earliest first: a later wake-up asked while an
        # earlier one is pending keeps its own round (two senders released a moment apart).
        self._wake_at: list[float] = []
        self._thread: threading.Thread | None = None

    def wake(self, after_seconds: float = 0.0) -> None:
        """Run a round in `after_seconds` (or at the next tick, if sooner); safe from any thread."""
        at = time.monotonic() + max(0.0, after_seconds)
        with self._lock:
            heapq.heappush(self._wake_at, at)
        self._woken.set()

    def _wait(self, seconds: float) -> bool:
        """Wait until the next round is due (`seconds` on, or a wake-up's time); True when stopped."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                if self._wake_at and self._wake_at[0] <= now:
                    # One round answers every wake-up due by now (or within COALESCE_SECONDS).
                    while self._wake_at and self._wake_at[0] <= now + COALESCE_SECONDS:
                        heapq.heappop(self._wake_at)
                    return False
                until = min(deadline, self._wake_at[0]) if self._wake_at else deadline
                self._woken.clear()
            if until <= now:
                return False
            self._woken.wait(until - now)
        return True

    def run_once(self) -> Any:  # pragma: no cover - each loop defines its round
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        if not self.run_at_start and self._wait(self.interval_seconds):
            return
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("%s: round failed; trying again", self.thread_name)
            self._wait(self.interval_seconds)
