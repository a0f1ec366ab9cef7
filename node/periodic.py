"""A background thread that calls `run_once()` every `interval_seconds` until stopped."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class PeriodicTask:
    """Base for the node's loops; a failing round is logged and the next one runs as usual."""

    thread_name = "pleura-periodic"
    run_at_start = True

    def __init__(self, interval_seconds: float) -> None:
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        if not self.run_at_start and self._stop.wait(self.interval_seconds):
            return
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("%s: round failed; trying again", self.thread_name)
            self._stop.wait(self.interval_seconds)
