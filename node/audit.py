"""The audit trail: who sent what, who was refused, and what was sent where.

One JSON object per line in ``<storage_dir>/audit.jsonl``, appended by every node process (the SCP
and the export worker): association requests accepted and rejected (calling AE, address, TLS),
instances stored or refused (with the status), results delivered or given up. Unlike the logs
(see ``node/privacy.py``) it names studies and instances by their UIDs: it is for the people who
answer for the data, and lives with it in the storage directory. Lines are written with one
``write()`` on a file opened for appending, so lines from several processes never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from config.private_files import PRIVATE_FILE_MODE, make_private_dirs

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"


class AuditTrail:
    def __init__(self, storage_dir: Path) -> None:
        self.path = Path(storage_dir) / AUDIT_FILE
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        """Append one event; a failure to write is logged, never raised (auditing must not refuse
        an instance the node has already stored)."""
        entry = {"time": datetime.now(timezone.utc).isoformat(), "event": event, **fields}
        line = (json.dumps(entry, default=str, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            with self._lock:
                make_private_dirs(self.path.parent)
                descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
                try:
                    os.write(descriptor, line)
                finally:
                    os.close(descriptor)
        except OSError as exc:
            log.error("cannot write the audit trail %s: %s", self.path, exc)

    def events(self) -> list[dict[str, Any]]:
        """Every recorded event, oldest first."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
