"""The Storage SCP on its own (no settling, no workers), with its ledger and store: the `node`
fixture of conftest.py, for the tests of what the SCP accepts and keeps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dicom_peers
from config.settings import Settings
from node.ledger import Ledger
from node.scp import StorageSCP
from node.storage import InstanceStore


@dataclass
class Node:
    settings: Settings
    ledger: Ledger
    store: InstanceStore
    scp: StorageSCP

    @property
    def port(self) -> int:
        return self.settings.port

    def quarantined(self) -> list[Path]:
        folder = self.settings.storage_dir / "quarantine"
        return sorted(folder.glob("*.dcm")) if folder.exists() else []


def running_node(folder: Path, **overrides: Any) -> Iterator[Node]:
    """An SCP listening on a free port of the loopback, storing under ``folder/store``; `overrides`
    are other settings."""
    settings = Settings(storage_dir=folder / "store", host="127.0.0.1", port=dicom_peers.free_port(), **overrides)
    settings.storage_dir.mkdir()
    ledger = Ledger(settings.ledger_url)
    store = InstanceStore(settings.storage_dir)
    scp = StorageSCP(settings, ledger, store)
    scp.start()
    try:
        yield Node(settings, ledger, store, scp)
    finally:
        scp.stop()
        ledger.close()
