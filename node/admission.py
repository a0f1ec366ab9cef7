"""Who may associate with the node, and when: the calling-AE allowlist and the free-space guard.

pynetdicom decides on an association request in its ACSE, from two properties of the AE read in
the association's own thread: ``require_calling_aet`` (rejected-permanent, "calling AE title not
recognised") and ``maximum_associations`` (rejected-transient, "local limit exceeded").
:class:`NodeAE` answers both per request: the allowlist per calling AE title and address, and no
room for a new association while the storage directory's file system is nearly full. That keeps
the refusal inside DICOM's own negotiation, instead of accepting and then aborting.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from config.settings import Settings
from node.connections import ConnectionGuard, Limits, NodeServer, Refused

FreeSpace = Callable[[], float]
"""Free space, in MB, where the node stores what it receives."""


def free_disk_mb(path: Path) -> float:
    """Free space for an unprivileged writer on the file system holding ``path`` (or its nearest
    existing parent), in MB."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 1_000_000


class Admission:
    """The node's rules for new associations and instances."""

    def __init__(self, settings: Settings, free_space: FreeSpace | None = None) -> None:
        self.min_free_mb = settings.min_free_disk_mb
        self.free_space = free_space or (lambda: free_disk_mb(settings.storage_dir))
        self.callers = {caller.ae_title: set(caller.hosts) for caller in settings.allowed_callers}

    def disk_refusal(self) -> str | None:
        """Why nothing more can be stored now (too little free space), or None."""
        if self.min_free_mb <= 0:
            return None
        free = self.free_space()
        if free < self.min_free_mb:
            return f"only {free:.0f} MB free for the storage directory (PLEURA_MIN_FREE_DISK_MB is {self.min_free_mb})"
        return None

    def address_allowed(self, host: str) -> bool:
        """Whether some allowed caller may call from `host`: checked on connect, before a byte of the
        association request is read (an allowlist without addresses allows every address)."""
        if not self.callers:
            return True
        return any(not hosts or host in hosts for hosts in self.callers.values())

    def caller_allowed(self, ae_title: str, host: str | None) -> bool:
        if not self.callers:
            return True
        hosts = self.callers.get(ae_title.strip())
        if hosts is None:
            return False
        return not hosts or host in hosts


class NodeAE(AE):
    """The node's AE: pynetdicom's, with :class:`Admission` deciding each association request, and
    its server guarding each connection (:mod:`node.connections`) when `limits` are given."""

    def __init__(
        self, ae_title: str, admission: Admission, limits: Limits | None = None, on_refused: Refused | None = None
    ) -> None:
        super().__init__(ae_title=ae_title)
        self.admission = admission
        self.limits = limits
        self.on_refused = on_refused

    def make_server(self, address: Any, *args: Any, server_class: Any = None, **kwargs: Any) -> Any:
        """pynetdicom's server, or the node's :class:`NodeServer` in its place (``start_server``
        asks for the threaded server)."""
        if self.limits is not None and server_class in (None, ThreadedAssociationServer):
            guard = ConnectionGuard(self.limits, self.admission.address_allowed, self.on_refused)
            try:
                return super().make_server(address, *args, server_class=NodeServer, guard=guard, **kwargs)
            except BaseException:
                guard.stop()
                raise
        return super().make_server(address, *args, server_class=server_class, **kwargs)

    @staticmethod
    def _requesting() -> Association | None:
        """The association being negotiated, when called from its thread."""
        current = threading.current_thread()
        return current if isinstance(current, Association) and current.is_acceptor else None

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = self._requesting()
        if assoc is None or not self.admission.callers:
            return []
        host = assoc.requestor.address
        calling = assoc.requestor.ae_title.strip()
        # pynetdicom rejects a calling AE title not in this list (an empty list allows anyone): leave
        # out the caller when its address is not one the allowlist gives it, keeping the list non-empty
        # with a title no one can call with (AE titles are never blank).
        allowed = [ae for ae in self.admission.callers if ae != calling or self.admission.caller_allowed(ae, host)]
        return allowed or [""]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        AE.require_calling_aet.fset(self, ae_titles)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def maximum_associations(self) -> int:
        if self._requesting() is not None and self.admission.disk_refusal() is not None:
            return 0  # no room: every new association is over the limit (rejected-transient)
        return AE.maximum_associations.fget(self)  # type: ignore[attr-defined]

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)  # type: ignore[attr-defined]
