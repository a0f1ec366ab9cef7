"""STOW-RS provider: ``POST /dicomweb/studies`` (PS3.18 10.5), for archives and gateways that push
studies over DICOMweb (Orthanc's ``/dicom-web/servers/<id>/stow``, a cloud DICOM store's export).

The request is ``multipart/related; type="application/dicom"``, one Part 10 instance per part. It
is read as it arrives (never held in memory): each part is written to a file under
``<storage_dir>/incoming/`` and, once whole, goes through the node's one receive path
(:class:`~node.receive.Receiver`, the SCP's), so an instance is named in the answer's Referenced
SOP Sequence only once it is on disk and in the ledger. A part that is not a Part 10 file is
quarantined with the reason and named in the Failed SOP Sequence with its Failure Reason; a part
larger than ``stow_max_part_bytes`` is refused (0xA700) and dropped, a request larger than
``stow_max_request_bytes`` is answered 413. Only users of the ``sender`` role may call it.

Answers: 200 every instance stored, 202 some refused, 409 none stored, 503 none stored because
the node is out of resources (try again), with an ``application/dicom+json`` body.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AllStoragePresentationContexts
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from config.settings import Settings
from node.api.auth import Principal, client_address, require_sender_role
from node.api.deps import get_settings
from config.private_files import make_private_dirs
from node.receive import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Answer, Arrival, Receiver
from node.scp import TRANSFER_SYNTAXES
from node.seg_labels import SEG_TRANSFER_SYNTAXES, SEGMENTATION_SOP_CLASS

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

INCOMING_DIR = "incoming"
DICOM_JSON = "application/dicom+json"
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STORAGE_SOP_CLASSES = frozenset(str(context.abstract_syntax) for context in AllStoragePresentationContexts)


@dataclass
class _Part:
    number: int
    path: Path
    handle: IO[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    too_large: bool = False
    head: bytes | None = b""  # the first bytes, until it is known whether the preamble is there


PREAMBLE = b"\0" * 128 + b"DICM"


class _StowRequest:
    """One request's parts, as the parser finds them; the batch of its rejected instances."""

    def __init__(self, folder: Path, max_part_bytes: int) -> None:
        self.folder = folder
        self.max_part_bytes = max_part_bytes
        self.part: _Part | None = None
        self.finished: list[_Part] = []
        self.count = 0
        self.ended = False  # too many rejected parts: the rest is not read
        self._field = b""
        self._value = b""

    def begin(self) -> None:
        self.count += 1
        handle = tempfile.NamedTemporaryFile(dir=self.folder, prefix=".stow-", suffix=".dcm", delete=False)
        self.part = _Part(self.count, Path(handle.name), handle)

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        if self.part is not None:
            self.part.headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        if part is None or part.too_large:
            return
        part.size += end - start
        if part.size > self.max_part_bytes:
            part.too_large = True  # the rest of it is not written
            return
        if part.head is None:
            part.handle.write(data[start:end])
            return
        part.head += data[start:end]
        if len(part.head) >= len(PREAMBLE):
            self._write_head(part)

    @staticmethod
    def _write_head(part: _Part) -> None:
        """Some clients (dicomweb-client among them) send the file meta without the 128-byte
        preamble and "DICM" that PS3.10 puts before it: they are added, so the part is a Part 10
        file like any other."""
        head = part.head or b""
        if head[128:132] != b"DICM" and head[:2] == b"\x02\x00":
            part.handle.write(PREAMBLE)
        part.handle.write(head)
        part.head = None

    def end(self) -> None:
        if self.part is not None:
            if self.part.head is not None and not self.part.too_large:
                self._write_head(self.part)
            self.part.handle.close()
            self.finished.append(self.part)
            self.part = None

    def discard(self) -> None:
        for part in [*self.finished, *([self.part] if self.part else [])]:
            part.handle.close()
            part.path.unlink(missing_ok=True)


def _part_answer(receiver: Receiver, settings: Settings, part: _Part, arrival: Arrival) -> Answer:
    """Receive one whole part: what its file meta says first (a Storage SOP class, a transfer
    syntax the node takes), then the receive path."""
    if part.too_large:
        return receiver.refuse(
            arrival, OUT_OF_RESOURCES, f"part of more than {settings.stow_max_part_bytes} bytes "
            "(PLEURA_STOW_MAX_PART_BYTES)", keep=False,
        )
    content_type = parse_options_header(part.headers.get("content-type", "application/dicom"))[0].decode().lower()
    if content_type != "application/dicom":
        return receiver.refuse(arrival, CANNOT_UNDERSTAND, f"part {part.number} is {content_type}, not application/dicom")
    try:
        meta = read_file_meta_info(part.path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        transfer_syntax = str(meta.TransferSyntaxUID)
        affected = str(meta.get("MediaStorageSOPInstanceUID", ""))
    except Exception as exc:  # pydicom raises many kinds of errors on what is not a Part 10 file
        return receiver.refuse(arrival, CANNOT_UNDERSTAND, f"part {part.number} is not a DICOM Part 10 file: {exc}")
    arrival = Arrival(
        data=part.path, calling_ae=arrival.calling_ae, address=arrival.address, sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax, affected_sop_instance_uid=affected, batch=arrival.batch,
        abort=arrival.abort, via="stow-rs",
    )
    if sop_class not in STORAGE_SOP_CLASSES:
        return _named(receiver.refuse(arrival, SOP_CLASS_NOT_SUPPORTED, "not a Storage SOP class", keep=False), arrival)
    syntaxes = SEG_TRANSFER_SYNTAXES if sop_class == SEGMENTATION_SOP_CLASS else TRANSFER_SYNTAXES
    if transfer_syntax not in syntaxes:
        reason = f"transfer syntax {transfer_syntax} is not one the node takes for this SOP class"
        return _named(receiver.refuse(arrival, TRANSFER_SYNTAX_NOT_SUPPORTED, reason, keep=False), arrival)
    answer = receiver.receive(arrival)
    return answer if answer.sop_instance_uid else _named(answer, arrival)


def _named(answer: Answer, arrival: Arrival) -> Answer:
    """The answer with the instance named as its file meta names it (it could not be read further)."""
    return Answer(answer.status, answer.comment, arrival.affected_sop_instance_uid or None, arrival.sop_class_uid)


def stow_response(answers: list[Answer]) -> tuple[int, dict[str, object]]:
    """The HTTP status and the DICOM JSON body of a STOW-RS answer (PS3.18 10.5.3)."""
    body = Dataset()
    stored, failed = [], []
    for answer in answers:
        item = Dataset()
        if answer.sop_class_uid:
            item.ReferencedSOPClassUID = answer.sop_class_uid
        if answer.sop_instance_uid:
            item.ReferencedSOPInstanceUID = answer.sop_instance_uid
        if answer.stored:
            stored.append(item)
        else:
            item.FailureReason = answer.status
            failed.append(item)
    if stored:
        body.ReferencedSOPSequence = stored
    if failed:
        body.FailedSOPSequence = failed
    if not failed:
        code = status.HTTP_200_OK
    elif stored:
        code = status.HTTP_202_ACCEPTED
    elif all((answer.status & 0xFF00) == OUT_OF_RESOURCES for answer in answers):
        code = status.HTTP_503_SERVICE_UNAVAILABLE
    else:
        code = status.HTTP_409_CONFLICT
    return code, body.to_json_dict()


@router.post(
    "/studies",
    summary="STOW-RS: store instances (multipart/related; type=\"application/dicom\")",
    responses={
        200: {"description": "every instance stored (Referenced SOP Sequence)"},
        202: {"description": "some instances refused (Failed SOP Sequence with each Failure Reason)"},
        409: {"description": "no instance stored"},
        413: {"description": "the request is larger than PLEURA_STOW_MAX_REQUEST_BYTES"},
        415: {"description": "not multipart/related; type=application/dicom"},
        503: {"description": "no instance stored: the node is out of resources for now; try again"},
    },
)
async def store_instances(
    request: Request, principal: Principal = Depends(require_sender_role), settings: Settings = Depends(get_settings)
) -> JSONResponse:
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    part_type = options.get(b"type", b"application/dicom").decode("latin-1").lower()
    if media_type.lower() != b"multipart/related" or part_type != "application/dicom" or b"boundary" not in options:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            'send multipart/related; type="application/dicom" with a boundary (one Part 10 instance per part)',
        )
    receiver: Receiver = request.app.state.receiver
    folder = receiver.store.root / INCOMING_DIR
    make_private_dirs(folder)
    parts = _StowRequest(folder, settings.stow_max_part_bytes)
    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_part_begin": parts.begin,
            "on_header_field": parts.header_field,
            "on_header_value": parts.header_value,
            "on_header_end": parts.header_end,
            "on_part_data": parts.data,
            "on_part_end": parts.end,
        },
    )

    def end_request() -> None:
        parts.ended = True

    template = Arrival(
        data=Path(), calling_ae=principal.name, address=client_address(request), sop_class_uid="",
        transfer_syntax_uid="", affected_sop_instance_uid="", batch=parts, abort=end_request, via="stow-rs",
    )
    answers: list[Answer] = []
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            while parts.finished and not parts.ended:
                part = parts.finished.pop(0)
                arrival = replace(template, data=part.path)
                answers.append(await run_in_threadpool(_part_answer, receiver, settings, part, arrival))
                part.path.unlink(missing_ok=True)  # still here when it was held already, or not kept
            if parts.ended:
                break
        parser.finalize()
    except MultipartParseError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"the multipart body cannot be parsed: {exc}") from None
    finally:
        parts.discard()  # what was not received (the request broke off, or was ended)
    if not answers:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the request holds no instance")
    code, body = stow_response(answers)
    log.info(
        "STOW-RS from %s: %d part(s), %d stored, %d refused",
        principal.name, len(answers), sum(a.stored for a in answers), sum(not a.stored for a in answers),
    )
    headers = {"Connection": "close"} if parts.ended else None
    return JSONResponse(body, code, media_type=DICOM_JSON, headers=headers)
