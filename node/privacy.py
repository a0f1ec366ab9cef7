"""What Pleura's logs may say about a patient's data: nothing that identifies it.

Logs go to consoles, journald and log collectors that many people read. DICOM UIDs are
identifiers (PS3.15 Annex E replaces them when de-identifying), so a log line names a study, an
instance or a result by :func:`ref`, a short one-way hash, never by its UID; patient names, IDs and
accession numbers are never logged. The ledger, the API and the audit trail (``node/audit.py``),
which are access-controlled, keep the UIDs; ``ref()`` of a UID found there finds its log lines.
"""

from __future__ import annotations

import hashlib
import re

REF_LENGTH = 12


def ref(uid: object) -> str:
    """``#`` and the first 12 hex digits of the SHA-256 of ``uid``; ``#-`` for none."""
    if uid is None or str(uid) == "":
        return "#-"
    return "#" + hashlib.sha256(str(uid).encode("utf-8")).hexdigest()[:REF_LENGTH]


_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"]*")
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def error_text(exc: BaseException, limit: int = 160) -> str:
    """An error in a few words for text a clinical object or the worklist shows: its kind and the
    first line of its message, with file paths and UID-like numbers taken out (an OSError quotes
    the file, a decoder may quote a UID)."""
    message = str(exc).splitlines()[0].strip() if str(exc).strip() else ""
    message = _UID.sub("<UID>", _PATH.sub("<file>", message))
    if len(message) > limit:
        message = message[: limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
