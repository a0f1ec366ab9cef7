"""What Pleura's logs may say about a patient's data: nothing that identifies it.

Logs go to consoles, journald and log collectors that many people read. DICOM UIDs are
identifiers (PS3.15 Annex E replaces them when de-identifying), so a log line names a study, an
instance or a result by :func:`ref`, a short one-way hash, never by its UID; patient names, IDs and
accession numbers are never logged. The ledger, the API and the audit trail (``node/audit.py``),
which are access-controlled, keep the UIDs; ``ref()`` of a UID found there finds its log lines.
"""

from __future__ import annotations

import hashlib

REF_LENGTH = 12


def ref(uid: object) -> str:
    """``#`` and the first 12 hex digits of the SHA-256 of ``uid``; ``#-`` for none."""
    if uid is None or str(uid) == "":
        return "#-"
    return "#" + hashlib.sha256(str(uid).encode("utf-8")).hexdigest()[:REF_LENGTH]
