"""Text from DICOM headers, made safe for the formats Pleura writes it into.

A header's text (PatientID, AccessionNumber, names, UIDs) comes from whoever sent the instance and
may hold any byte its character set allows. Written as it is into an HL7 v2 message, a carriage
return starts a new segment (``P1\\rOBX|9|...`` adds an observation) and ``\\x1c\\r`` ends the MLLP
frame early, so the receiver acknowledges half a message; in a log line a newline forges a line.
So every value from a header passes :func:`header_text` (control characters removed) and then the
target format's own escaping: :func:`hl7_escape` for HL7 ER7, ``json.dumps`` for JSON. A text log
line shows them escaped instead (:func:`log_text`, applied to every message by node/logs.py).

This module sits below ``node/notify`` and the logging set-up so that every writer of header text
(HL7, webhooks, FHIR, logs) shares one definition of "control character".
"""

from __future__ import annotations

import re

# C0 controls (0x00-0x1F: NUL, VT = MLLP start block, FS = MLLP end block, CR, LF, ...), DEL and
# the C1 controls (0x80-0x9F), which no DICOM character set uses for text either.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")

# HL7 v2 escape sequences (v2.5.1 chapter 2.7) for the default delimiters MSH-1 and MSH-2 declare.
# The escape character goes first, so the sequences added after it are not escaped again.
_HL7_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def header_text(value: object) -> str:
    """`value` as text without control characters (removed, not replaced: a PatientID with a stray
    CR is still the same ID to a person reading it); None is the empty string."""
    if value is None:
        return ""
    return CONTROL_CHARACTERS.sub("", str(value))


def hl7_escape(value: object) -> str:
    """`value` for one HL7 v2 field or component: control characters removed, delimiters escaped
    (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``), so it can neither add a field, component or segment nor
    end the MLLP frame."""
    text = header_text(value)
    for char, sequence in _HL7_ESCAPES:
        text = text.replace(char, sequence)
    return text


# In a log line: the usual short escapes, else ``\xNN``.
_LOG_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def log_text(value: object) -> str:
    """`value` for one line of a text log: control characters shown as escapes (``\\r``, ``\\n``,
    ``\\x1b``) rather than removed, so a line break or terminal escape that a peer sent (in an AE
    title, a header) is visible and inert: it can neither forge a log line nor act on a terminal."""
    return CONTROL_CHARACTERS.sub(lambda match: _LOG_ESCAPES.get(match[0], f"\\x{ord(match[0]):02x}"), str(value))
