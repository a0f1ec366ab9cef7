"""A minimal receiving PACS for the demo: a Storage SCP that keeps every object it is sent.

The tests use Orthanc as the PACS; the demo must run on a machine that has none.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


class ReceivingPACS:
    def __init__(self, folder: Path, ae_title: str = "DEMOPACS", host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.received: list[Path] = []
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        target = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        with self._lock:
            self.received.append(target)
        return 0x0000

    def start(self) -> "ReceivingPACS":
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
