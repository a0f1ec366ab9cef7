"""HL7 v2.5.1 ORU^R01 messages about a study's flag (built with hl7apy) and MLLP delivery.

The message names the patient (PID-3) and the order (accession number in ORC-3 / OBR-3) so the RIS
can match it; the finding is OBX 1 with the urgency in OBX-8 and the priority in OBR-5, both set
per destination. A withdrawn flag is a corrected result (OBR-25 / OBX-11 = C).

Every text value goes through ``node/text.py`` first (control characters removed, delimiters
escaped): PatientID and AccessionNumber come from DICOM headers, and a CR or an MLLP end block in
them would add segments or cut the frame. A message counts as delivered only when the receiver's
ACK accepts it (AA / CA) and names its control ID (MSA-2 = MSH-10).
"""

from __future__ import annotations

import socket
import uuid
from datetime import datetime
from typing import Any

from hl7apy.core import Message
from hl7apy.factories import datatype_factory
from hl7apy.parser import parse_message

from config.errors import PleuraError
from config.destinations import Hl7Destination
from node.text import header_text, hl7_escape
from node.tls import hl7_client_context

HL7_VERSION = "2.5.1"
START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
SYNTHETIC_NOTE = "SYNTHETIC DEMO MODEL - not for clinical use"


class MllpError(PleuraError, RuntimeError):
    """The message could not be delivered, or the receiver did not accept it."""

    def __init__(self, message: str, *, ack: str | None = None) -> None:
        super().__init__(message)
        self.ack = ack  # the receiver's acknowledgement, when one came


class MllpRejected(MllpError):
    """The receiver answered AR or CR (application / commit reject): it will never take this
    message, so sending it again is pointless; the reason (MSA-3, ERR) is in the text."""


REJECT_CODES = ("AR", "CR")


def _refusal_text(ack: str, parsed: Any) -> str:
    """MSA-3 and every ERR segment's error code and message, as one line."""
    parts = []
    try:
        text = parsed.msa.msa_3.value
    except Exception:
        text = ""
    if text:
        parts.append(text)
    for segment in ack.replace("\n", "\r").split("\r"):
        if segment.startswith("ERR"):
            fields = [f.replace("^", " ").strip() for f in segment.split(segment[3:4])[1:]] if len(segment) > 3 else []
            detail = "; ".join(f for f in fields if f and len(f) > 1)  # leave out the severity letter
            if detail:
                parts.append(f"ERR {detail}")
    return " — ".join(parts)


def _ts(value: datetime) -> str:
    return value.strftime("%Y%m%d%H%M%S%z") or value.strftime("%Y%m%d%H%M%S")


def _text(value: Any, datatype: str = "ST") -> Any:
    """A value without control characters, escaped for HL7 by hl7apy (\\F\\, \\S\\, \\T\\,
    \\R\\, \\E\\); hl7apy escapes delimiters but passes CR and the MLLP block bytes through."""
    return datatype_factory(datatype, header_text(value), version=HL7_VERSION)


def _varies(value: Any) -> str:
    """A value for a field of type "varies" (OBX-5), escaped here: hl7apy keeps escape sequences."""
    return hl7_escape(value)


def _observation(order: Any, index: int, kind: str, code: str, value: Any, status: str, **extra: str) -> None:
    obx = order.add_group("ORU_R01_OBSERVATION").obx
    obx.obx_1 = str(index)
    obx.obx_2 = kind
    obx.obx_3 = code
    obx.obx_5 = _varies(value)
    for field, field_value in extra.items():
        setattr(obx, field, field_value)
    obx.obx_11 = status


def build_oru(
    study: dict[str, Any],
    event: str,
    destination: Hl7Destination,
    *,
    sending_application: str,
    sending_facility: str,
    now: datetime,
    control_id: str | None = None,
) -> str:
    """The ORU^R01 (ER7, segments separated by CR) for `event` ("flagged" or "withdrawn").

    Result status (OBR-25, OBX-11): ``F`` for a first flag; ``C`` (correction) for a withdrawn
    flag, and for a flag that corrects an earlier message about the study (``study["correction"]``:
    a re-analysis or a radiologist's verdict changed the decision announced before)."""
    flagged = event == "flagged"
    status = "F" if flagged and not study.get("correction") else "C"
    message = Message("ORU_R01", version=HL7_VERSION)
    msh = message.msh
    msh.msh_3.hd_1 = _text(sending_application, "IS")
    msh.msh_4.hd_1 = _text(sending_facility, "IS")
    msh.msh_5.hd_1 = _text(destination.receiving_application, "IS")
    msh.msh_6.hd_1 = _text(destination.receiving_facility, "IS")
    msh.msh_7 = _ts(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id or "PLR" + uuid.uuid4().hex[:17].upper()
    msh.msh_11 = "P"
    msh.msh_12 = HL7_VERSION

    result = message.add_group("ORU_R01_PATIENT_RESULT")
    result.add_group("ORU_R01_PATIENT")
    pid = result.oru_r01_patient.pid
    pid.pid_1 = "1"
    pid.pid_3.cx_1 = _text(study.get("patient_id") or "UNKNOWN")

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    accession = study.get("accession_number") or ""
    order.orc.orc_1 = "RE"
    if accession:
        order.orc.orc_3.ei_1 = _text(accession)
    obr = order.obr
    obr.obr_1 = "1"
    if accession:
        obr.obr_3.ei_1 = _text(accession)
    obr.obr_4 = "PTX-AI^Pneumothorax AI triage^L"
    obr.obr_5 = destination.priority if flagged else "R"
    analysed = study.get("analysed_at")
    if isinstance(analysed, datetime):
        obr.obr_7 = _ts(analysed)
    obr.obr_22 = _ts(now)
    obr.obr_25 = status

    index = 1
    finding = "SUSPECTED" if flagged else "NOT SUSPECTED"
    extra = {"obx_8": destination.abnormal_flag} if flagged else {"obx_8": "N"}
    _observation(order, index, "ST", "PTX-FLAG^Pneumothorax suspected^L", finding, status, **extra)
    if study.get("probability") is not None:
        index += 1
        _observation(order, index, "NM", "PTX-PROB^Pneumothorax probability^L", f"{study['probability']:.3f}", status)
    if study.get("area_cm2") is not None:
        index += 1
        _observation(
            order, index, "NM", "PTX-AREA^Largest suspected area^L", f"{study['area_cm2']:.1f}", status, obx_6="cm2"
        )
    images = study.get("images") or []
    sides = sorted({str(i["side"]) for i in images if i.get("flagged") and i.get("side")})
    if sides:
        index += 1
        _observation(order, index, "ST", "PTX-SIDE^Side^L", ", ".join(sides), status)
    gaps = [float(i["largest_gap_mm"]) for i in images if i.get("flagged") and i.get("largest_gap_mm") is not None]
    if gaps:
        index += 1
        _observation(order, index, "NM", "PTX-GAP^Largest pleural gap^L", f"{max(gaps):.1f}", status, obx_6="mm")
    # The model's rule for the image that decided the study (flagged, else the most probable).
    decided = [i for i in images if i.get("flagged")] or sorted(images, key=lambda i: -(i.get("probability") or 0))
    rule = next((str(i["reason"]) for i in decided if i.get("reason")), None)
    if rule:
        index += 1
        _observation(order, index, "ST", "PTX-RULE^Decision rule^L", rule, status)
    feedback = study.get("feedback")
    if feedback:
        index += 1
        _observation(order, index, "ST", "PTX-REVIEW^Radiologist review^L", feedback["verdict"], status)
    model = f"{study.get('model_name') or '?'} {study.get('model_version') or '?'}"
    if study.get("synthetic_model"):
        model += f" ({SYNTHETIC_NOTE})"
    index += 1
    _observation(order, index, "ST", "PTX-MODEL^Algorithm^L", model, status)
    index += 1
    _observation(order, index, "ST", "STUDY-UID^Study Instance UID^L", study["study_uid"], status)
    return message.to_er7()


def _control_id(message: str) -> str:
    """MSH-10 of an ER7 message (the MSH's fields split on MSH-1, which is the fourth character)."""
    separator = message[3:4]
    fields = message.split("\r", 1)[0].split(separator) if separator else []
    if len(fields) < 10 or not fields[9]:
        raise MllpError("the message has no control ID (MSH-10)")
    return fields[9]


def open_mllp(destination: Hl7Destination, *, timeout: float | None = None) -> socket.socket:
    """A connected socket to ``destination``'s MLLP listener, inside TLS (handshake done, the
    certificate checked) when the destination has ``tls``; the caller closes it. ``timeout``
    defaults to the destination's ``timeout_seconds``. Raises OSError (ssl.SSLError included)
    when it cannot connect."""
    sock = socket.create_connection(
        (destination.host, destination.port), timeout=timeout if timeout is not None else destination.timeout_seconds
    )
    context = hl7_client_context(destination)
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock, server_hostname=destination.host)
    except BaseException:
        sock.close()
        raise


def send_mllp(destination: Hl7Destination, message: str) -> str:
    """Send one message in an MLLP block and return the receiver's ACK (ER7).

    Raises :class:`MllpError` when the connection fails, no ACK comes back, the ACK is not AA / CA
    (application or commit accept), or it acknowledges another message (MSA-2 is not our MSH-10):
    a receiver that mixes up its answers must not make a critical result count as delivered. An AR /
    CR for our message raises :class:`MllpRejected`: final, where an AE / CE may pass on a retry."""
    control_id = _control_id(message)
    payload = message.encode("utf-8")
    if START_BLOCK in payload or b"\x1c" in payload:
        # build_oru() never makes one; a stored payload from before node/text.py might.
        raise MllpError("the message holds MLLP framing bytes (0x0B or 0x1C) and would be cut short")
    frame = START_BLOCK + payload + END_BLOCK
    try:
        with open_mllp(destination) as sock:
            sock.sendall(frame)
            received = b""
            while END_BLOCK not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    raise MllpError("the receiver closed the connection without an acknowledgement")
                received += chunk
                if len(received) > 1_000_000:
                    raise MllpError("the acknowledgement is larger than 1 MB")
    except OSError as exc:
        raise MllpError(f"{type(exc).__name__}: {exc}") from exc
    ack = received.split(END_BLOCK, 1)[0].lstrip(START_BLOCK).decode("utf-8", "replace")
    try:
        parsed = parse_message(ack.replace("\n", "\r"), find_groups=False)
        code = parsed.msa.msa_1.value
        acknowledged = parsed.msa.msa_2.value
    except Exception as exc:
        raise MllpError(f"unreadable acknowledgement: {exc}") from exc
    if acknowledged != control_id:
        raise MllpError(f"the acknowledgement is for message {acknowledged!r}, not {control_id!r} (MSA-2 != MSH-10)")
    if code not in ("AA", "CA"):
        text = _refusal_text(ack, parsed)
        refusal = MllpRejected if code in REJECT_CODES else MllpError
        raise refusal(f"the receiver answered {code}{': ' + text if text else ''}", ack=ack)
    return ack
