"""The worker's model, kept in step with the registry: a promoted model is picked up without a restart.

A worker is ready only when it can answer fast. :meth:`ActiveModel.warm` loads the active bundle and
warms it (the networks built, exported to ONNX and timed where ``inference_backend`` asks for it, one
forward pass) before the worker takes its first task; meanwhile the worker's status report says
``warming``, and its ``/readyz`` is not ready.

Before each task (and every ``model_poll_seconds`` in between, :meth:`ActiveModel.follow`) the worker
asks :func:`contract.active.active_bundle_dir` which bundle is active (a stat of the small registry
state file; read again only when it changed). When that is another bundle than the one loaded, the
new one is checked, loaded and warmed beside the old one, in a thread of its own; tasks keep getting
the old one until then, and then the new one replaces it in a single assignment. A task holds the
analyser it was given from start to end, so a study already in flight finishes with the model it
started with. A model that is no longer the active one when it is warm (rolled back meanwhile) is
dropped; one switch runs at a time, and the next is started by the next look at the registry.

A bundle that fails to load (corrupted after promotion, a damaged state file) does not stop the
worker: it keeps the model it has, logs the reason and writes it to its status report, where
`pleura models list` shows it. The same bundle is not tried again until the active version changes
once more.

The status report (``<registry>/workers/<host>-<pid>.<kind>.json``, beside a fixed bundle
``<storage_dir>/models/workers/``): ``state`` (``warming`` until a model is warm, then ``ready``),
``loaded`` (the model in use), ``warming`` (the model being warmed beside it, or None), ``error``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from contract.active import (
    RegistryLayout, active_bundle_dir, find_version_record, validate_bundle, worker_reports_root,
)
from contract.bundle import BundleError, load_bundle

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


WARMING, READY = "warming", "ready"


def _label(bundle_dir: Path) -> str:
    """The version a bundle directory holds, for the status report before it is loaded."""
    try:
        return load_bundle(bundle_dir).identity.label
    except Exception:  # not there yet (a demo bundle built on first use) or broken: the load says why
        return str(bundle_dir)


@dataclass
class ActiveModel:
    """The analyser of one worker process for one kind of input, swapped when the registry changes."""

    settings: "Settings"
    kind: str = "radiograph"
    loader: "Callable[[Settings, Path], Any] | None" = None
    """Builds the analyser of a bundle directory (default: the radiograph StudyAnalyser); whatever
    it returns must have ``.bundle`` (the loaded :class:`~contract.bundle.Bundle`), and its
    ``warm()``, when it has one, is called before it serves a task."""
    analyser: Any = None
    loaded_dir: Path | None = None
    failed_dir: Path | None = None
    failed: bool = False
    warming_dir: Path | None = None
    """The bundle being loaded and warmed beside the current one (None: no switch under way)."""
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _switch: threading.Thread | None = None

    def warm(self) -> Any:
        """Load and warm the active model in this thread, before the worker takes tasks; the
        status report says ``warming`` meanwhile. Raises when it cannot be loaded."""
        return self.current()

    def current(self) -> Any:
        """The analyser for the next task: the warm one.

        With no model yet (the worker's start-up), the active one is loaded and warmed here. When
        the active bundle changed, the new one is loaded and warmed in a thread beside the current
        one, which is returned until the new one is warm. Raises only when no model was ever
        loaded (the task then fails and is retried).
        """
        with self._lock:
            try:
                wanted = active_bundle_dir(self.settings, self.kind)
            except BundleError as exc:
                if self.analyser is None:
                    raise
                self._report_failure(None, exc)
                return self.analyser
            if self.analyser is None:
                self._record({"state": WARMING, "loaded": None, "warming": _label(wanted), "bundle_dir": None,
                              "error": None})
                try:
                    analyser = self._load(wanted)
                except Exception as exc:
                    self._record({"state": WARMING, "loaded": None, "warming": None, "bundle_dir": None,
                                  "error": f"{type(exc).__name__}: {exc}", "failed_bundle_dir": str(wanted)})
                    raise
                self._install(analyser, wanted)
                return analyser
            if wanted == self.loaded_dir:
                if self.failed:  # back to the loaded model (a rollback): the failure is history
                    self.failed, self.failed_dir = False, None
                    self._record_ready()
                return self.analyser
            if wanted == self.failed_dir or self._switch is not None:
                # tried already (not again until the active version changes), or a switch under
                # way: the next look after it ends starts the next one
                return self.analyser
            self._start_switch(wanted)
            return self.analyser

    def follow(self, interval: float, stop: threading.Event | None = None) -> threading.Thread:
        """Look at the registry every ``interval`` seconds in a daemon thread, so a promoted model
        is warmed before a study asks for it."""
        stop = stop or threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                try:
                    self.current()
                except Exception as exc:  # no model yet and none loadable: the next task says why
                    log.debug("the %s model is not loadable yet: %s", self.kind, exc)

        thread = threading.Thread(target=run, name=f"pleura-model-{self.kind}", daemon=True)
        thread.start()
        return thread

    def wait_for_switch(self, timeout: float | None = None) -> None:
        """Until the switch under way (if any) has ended."""
        switch = self._switch
        if switch is not None:
            switch.join(timeout)

    def _start_switch(self, wanted: Path) -> None:
        self.warming_dir = wanted
        self._record_ready(warming=_label(wanted))
        self._switch = threading.Thread(target=self._switch_to, args=(wanted,), name=f"pleura-warm-{self.kind}",
                                        daemon=True)
        self._switch.start()

    def _switch_to(self, wanted: Path) -> None:
        """The switch thread: load and warm ``wanted`` beside the current model, then swap."""
        try:
            analyser = self._load(wanted)
        except Exception as exc:
            with self._lock:
                self._switch = self.warming_dir = None
                self._report_failure(wanted, exc)
            return
        with self._lock:
            self._switch = self.warming_dir = None
            try:
                still_wanted = active_bundle_dir(self.settings, self.kind) == wanted
            except BundleError:
                still_wanted = False
            if not still_wanted:  # rolled back (or promoted again) while it warmed
                log.info("model %s warmed but no longer active: not used", analyser.bundle.identity.label)
                self._record_ready()
                return
            self._install(analyser, wanted)

    def _install(self, analyser: Any, wanted: Path) -> None:
        previous = self.analyser.bundle.identity.label if self.analyser is not None else None
        # One assignment: a task in flight keeps the analyser it was given.
        self.analyser, self.loaded_dir, self.failed_dir, self.failed = analyser, wanted, None, False
        label = analyser.bundle.identity.label
        if previous is not None:
            log.warning("model changed: %s -> %s (%s)", previous, label, wanted)
        else:
            log.info("model loaded and warm: %s (%s)", label, wanted)
        self._record_ready()

    def _record_ready(self, warming: str | None = None) -> None:
        self._record({"state": READY, "loaded": self.analyser.bundle.identity.label, "warming": warming,
                      "bundle_dir": str(self.loaded_dir), "error": None})

    def _load(self, bundle_dir: Path) -> Any:
        record = find_version_record(self.settings, bundle_dir)
        if record is not None:
            # A registered version: its files must still be those checked at import. Building the
            # networks (load_models, in the analyser) is the rest of the check.
            validate_bundle(bundle_dir, kind=self.kind, checksums=record.files, networks="skip")
        if self.loader is not None:
            analyser = self.loader(self.settings, bundle_dir)
        else:
            from worker.analysis import StudyAnalyser  # imports torch: only in worker processes

            analyser = StudyAnalyser.for_settings(self.settings, bundle_dir)
        warm = getattr(analyser, "warm", None)
        if callable(warm):
            warm()
        return analyser

    def _report_failure(self, wanted: Path | None, exc: Exception) -> None:
        self.failed_dir, self.failed = wanted, True
        current = self.analyser.bundle.identity.label if self.analyser is not None else None
        log.error("cannot load the active %s model, keeping %s: %s", self.kind, current, exc)
        self._record(
            {"state": READY if self.analyser is not None else WARMING, "loaded": current, "warming": None,
             "bundle_dir": str(self.loaded_dir), "error": f"{type(exc).__name__}: {exc}",
             "failed_bundle_dir": str(wanted) if wanted else None}
        )

    def _record(self, status: dict[str, Any]) -> None:
        root = worker_reports_root(self.settings)
        try:
            RegistryLayout(root).record_worker(worker_id(), self.kind, {"pid": os.getpid(), "ppid": os.getppid(), **status})
        except OSError as exc:
            log.warning("cannot record the worker's model status in %s: %s", root, exc)
