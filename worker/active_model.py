"""The worker's model, kept in step with the registry: a promoted model is picked up without a restart.

Before each task the worker asks :func:`contract.active.active_bundle_dir` which bundle is active
(a stat of the small registry state file; read again only when it changed). When that is another
bundle than the one loaded, the new one is checked and loaded, and then replaces the old one in a
single assignment. A task holds the analyser it was given from start to end, so a study already in
flight finishes with the model it started with.

A bundle that fails to load (corrupted after promotion, a damaged state file) does not stop the
worker: it keeps the model it has, logs the reason and writes it to the registry's ``workers/``
folder, where `pleura models list` shows it. The same bundle is not tried again until the active
version changes once more.
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

from contract.active import RegistryLayout, active_bundle_dir, find_version_record, registry_root, validate_bundle
from contract.bundle import BundleError

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ActiveModel:
    """The analyser of one worker process for one kind of input, swapped when the registry changes."""

    settings: "Settings"
    kind: str = "radiograph"
    loader: "Callable[[Settings, Path], Any] | None" = None
    """Builds the analyser of a bundle directory (default: the radiograph StudyAnalyser); whatever
    it returns must have ``.bundle`` (the loaded :class:`~contract.bundle.Bundle`)."""
    analyser: Any = None
    loaded_dir: Path | None = None
    failed_dir: Path | None = None
    failed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> Any:
        """The analyser for the next task: the active bundle's, loading it when it changed.

        Raises only when no model was ever loaded (the task then fails and is retried).
        """
        with self._lock:
            try:
                wanted = active_bundle_dir(self.settings, self.kind)
            except BundleError as exc:
                if self.analyser is None:
                    raise
                self._report_failure(None, exc)
                return self.analyser
            if self.analyser is not None and wanted == self.loaded_dir:
                if self.failed:  # back to the loaded model (a rollback): the failure is history
                    self.failed, self.failed_dir = False, None
                    self._record({"loaded": self.analyser.bundle.identity.label, "bundle_dir": str(wanted), "error": None})
                return self.analyser
            if self.analyser is not None and wanted == self.failed_dir:
                return self.analyser  # tried already: not again until the active version changes
            try:
                analyser = self._load(wanted)
            except Exception as exc:
                if self.analyser is None:
                    raise
                self._report_failure(wanted, exc)
                return self.analyser
            previous = self.analyser.bundle.identity.label if self.analyser is not None else None
            # One assignment: a task in flight keeps the analyser it was given.
            self.analyser, self.loaded_dir, self.failed_dir, self.failed = analyser, wanted, None, False
            label = analyser.bundle.identity.label
            if previous is not None:
                log.warning("model changed: %s -> %s (%s)", previous, label, wanted)
            else:
                log.info("model loaded: %s (%s)", label, wanted)
            self._record({"loaded": label, "bundle_dir": str(wanted), "error": None})
            return analyser

    def _load(self, bundle_dir: Path) -> Any:
        record = find_version_record(self.settings, bundle_dir)
        if record is not None:
            # A registered version: its files must still be those checked at import. Building the
            # networks (load_models, in the analyser) is the rest of the check.
            validate_bundle(bundle_dir, kind=self.kind, checksums=record.files, networks="skip")
        if self.loader is not None:
            return self.loader(self.settings, bundle_dir)
        from worker.analysis import StudyAnalyser  # imports torch: only in worker processes

        return StudyAnalyser.for_settings(self.settings, bundle_dir)

    def _report_failure(self, wanted: Path | None, exc: Exception) -> None:
        self.failed_dir, self.failed = wanted, True
        current = self.analyser.bundle.identity.label if self.analyser is not None else None
        log.error("cannot load the active %s model, keeping %s: %s", self.kind, current, exc)
        self._record(
            {"loaded": current, "bundle_dir": str(self.loaded_dir), "error": f"{type(exc).__name__}: {exc}",
             "failed_bundle_dir": str(wanted) if wanted else None}
        )

    def _record(self, status: dict[str, Any]) -> None:
        root = registry_root(self.settings)
        if root is None:  # a fixed bundle: no registry to write to; the log has it
            return
        try:
            RegistryLayout(root).record_worker(worker_id(), self.kind, {"pid": os.getpid(), **status})
        except OSError as exc:
            log.warning("cannot record the worker's model status in %s: %s", root, exc)
