"""Library warnings that would carry header values into the logs, rewritten without them.

pydicom and highdicom quote the value they warn about: ``Invalid value for VR DA: '19700101x'``,
``The string "DOE" is unlikely to represent the intended person name``; with
``logging.captureWarnings`` on (``node/logs.py``), and pydicom also logging them itself, those
values (patient names, IDs, dates) would reach the logs, which ``node/privacy.py`` promises never
happens. :class:`LibraryValueFilter` sits on the log handler and rewrites such records: known
messages to a fixed sentence naming what was wrong (the VR, never the value), any other record of
these libraries with its quoted parts replaced. A logging filter rather than ``warnings`` filters:
pydicom sends the same text through its own logger too, and the warning is still worth a line.
"""

from __future__ import annotations

import logging
import re

from node.text import header_text

LIBRARIES = ("pydicom", "highdicom")
WARNINGS_LOGGER = "py.warnings"  # where logging.captureWarnings sends Python warnings
NOT_LOGGED = "<value not logged>"

_INVALID_VR = re.compile(r"Invalid value for VR (?P<vr>[A-Z]{2})")
_PERSON_NAME = re.compile(r"is unlikely to represent the intended person name")
_QUOTED = re.compile(r"""(['"]).*?\1|b(['"]).*?\2""", re.DOTALL)
_WARNING_LINE = re.compile(r"^(?P<where>.*?):(?P<line>\d+): (?P<category>\w+): ", re.DOTALL)


def rewrite(message: str, library: str) -> str:
    """The message of a pydicom / highdicom warning or log record without the values it quotes."""
    vr = _INVALID_VR.search(message)
    if vr:
        return f"{library}: invalid value for VR {vr['vr']} in a header (value not logged)"
    if _PERSON_NAME.search(message):
        return f"{library}: a person name with a single component in a header (value not logged)"
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    return header_text(_QUOTED.sub(NOT_LOGGED, first_line))


def _library_of(record: logging.LogRecord, message: str) -> str | None:
    for library in LIBRARIES:
        if record.name == library or record.name.startswith(library + "."):
            return library
    if record.name == WARNINGS_LOGGER:
        if _INVALID_VR.search(message):
            return "pydicom"
        if _PERSON_NAME.search(message):
            return "highdicom"
        match = _WARNING_LINE.match(message)
        where = match["where"] if match else ""
        for library in LIBRARIES:
            if f"/{library}/" in where or f"{library}." in message or f"{library}/" in message:
                return library
    return None


class LibraryValueFilter(logging.Filter):
    """Rewrites the records of pydicom and highdicom (their loggers, and their Python warnings)
    so that no header value quoted in them is written; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the formatter's to report
            return True
        library = _library_of(record, message)
        if library is not None:
            if record.name == WARNINGS_LOGGER:
                match = _WARNING_LINE.match(message)
                message = message[match.end():] if match else message
            record.msg, record.args = rewrite(message, library), ()
        return True


def protect_handler(handler: logging.Handler) -> logging.Handler:
    """Put the filter on `handler` (once) and return it; the logging set-up calls this."""
    if not any(isinstance(existing, LibraryValueFilter) for existing in handler.filters):
        handler.addFilter(LibraryValueFilter())
    return handler
