"""Delivery of results (SR, SEG, GSPS, SC) to the destinations, through the durable outbox.

:func:`send_results` is the Storage SCU (C-STORE), :func:`node.stow.stow_results` the STOW-RS user
(DICOMweb destinations); both answer one status per file. :func:`deliver_outbox_entry` is one
delivery attempt of one outbox row, whichever the kind of destination: it records the outcome in
the ledger (a warning with it) and says when to try again.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from config.errors import PleuraError
from config.destinations import Destination, DicomwebDestination
from config.settings import Settings
from node.ledger import Ledger, OutboxStatus, utcnow
from node.audit import AuditTrail
from node.privacy import ref
from node.stow import describe_reason, is_permanent_reason, stow_results
from node.storage import InstanceStore
from node.tls import client_context

log = logging.getLogger(__name__)

SOP_CLASS_NOT_SUPPORTED = 0x0122
"""Returned in place of a peer status for a file whose SOP class the peer did not accept."""

CONNECTION_TIMEOUT_SECONDS = 10
MAX_PRESENTATION_CONTEXTS = 128
DEFAULT_LEASE_SECONDS = 600.0


class DeliveryError(PleuraError, RuntimeError):
    """No association with the destination, or it ended before every file got an answer.

    ``permanent`` is True when the destination refused for good (an association rejected as
    permanent, e.g. our calling AE title is unknown there): trying again cannot help until someone
    changes a configuration, so the delivery is marked failed at once.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# C-STORE failure statuses that a retry of the same object cannot turn into success (PS3.4 B.2.3:
# "Error: data set does not match SOP class", "Error: cannot understand"), and ours for a SOP class
# the destination did not accept. "Refused: out of resources" (0xA7xx) is worth retrying.
def is_permanent_failure(status: int) -> bool:
    return status == SOP_CLASS_NOT_SUPPORTED or (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000


def is_success(status: int) -> bool:
    """Success or a warning: the destination stored the instance."""
    return code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def describe_status(status: int) -> str:
    if status == SOP_CLASS_NOT_SUPPORTED:
        return "SOP class not supported by the destination"
    if status in STORAGE_SERVICE_CLASS_STATUS:
        category, description = STORAGE_SERVICE_CLASS_STATUS[status]
        return f"{category}: {description}"
    return code_to_category(status)


def _file_identity(path: Path) -> tuple[UID, UID]:
    """The SOP class and transfer syntax of a Part 10 file, from its file meta information."""
    try:
        meta = read_file_meta_info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"result file {path} does not exist") from None
    except Exception as exc:
        raise ValueError(f"result file {path} is not a DICOM Part 10 file: {exc}") from None
    sop_class = meta.get("MediaStorageSOPClassUID")
    transfer_syntax = meta.get("TransferSyntaxUID")
    if not sop_class or not transfer_syntax:
        raise ValueError(
            f"result file {path} lacks Media Storage SOP Class UID (0002,0002) or Transfer Syntax UID (0002,0010)"
        )
    return UID(sop_class), UID(transfer_syntax)


def requested_contexts(files: Sequence[tuple[UID, UID]]) -> list[PresentationContext]:
    """One context per SOP class, proposing each file's own transfer syntax, plus explicit and
    implicit VR little endian (pynetdicom converts between uncompressed syntaxes; a compressed file
    is decompressed when the destination takes only those, see :func:`send_results`)."""
    by_class: dict[str, list[str]] = {}
    for sop_class, transfer_syntax in files:
        syntaxes = by_class.setdefault(str(sop_class), [])
        candidates = [transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for candidate in candidates:
            if str(candidate) not in syntaxes:
                syntaxes.append(str(candidate))
    if len(by_class) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(by_class)} SOP classes in one association; at most {MAX_PRESENTATION_CONTEXTS}")
    return [build_context(sop_class, syntaxes) for sop_class, syntaxes in by_class.items()]


def send_results(
    destination: Destination, calling_ae: str, paths: list[Path], tls: ssl.SSLContext | None = None
) -> list[int]:
    """C-STORE each file to `destination` in one association (over TLS with `tls`); returns one
    status per file.

    A file whose SOP class the destination did not accept gets :data:`SOP_CLASS_NOT_SUPPORTED`
    without being sent. Raises :class:`DeliveryError` when no association can be made or it ends
    before every file has an answer, and ValueError/FileNotFoundError for a file that cannot be sent.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return []
    identities = [_file_identity(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = CONNECTION_TIMEOUT_SECONDS
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 60
    ae.requested_contexts = requested_contexts(identities)

    tls_args = (tls, destination.host) if tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            answer = assoc.acceptor.primitive
            permanent = getattr(answer, "result", None) == 0x01
            why = f": {answer.result_str}, {answer.reason_str}" if answer is not None else ""
            raise DeliveryError(
                f"{destination.label} rejected the association{why} (is {calling_ae} a known AE there?)",
                permanent=permanent,
            )
        raise DeliveryError(f"cannot associate with {destination.label}: connection refused, timed out or aborted")
    statuses: list[int] = []
    try:
        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        for path, (sop_class, transfer_syntax) in zip(paths, identities, strict=True):
            syntaxes = accepted.get(str(sop_class))
            if not syntaxes:
                statuses.append(SOP_CLASS_NOT_SUPPORTED)
                continue
            if transfer_syntax.is_compressed and str(transfer_syntax) not in syntaxes:
                # The destination takes this class only uncompressed: decode and send that.
                dataset = dcmread(path)
                dataset.decompress()
                response = assoc.send_c_store(dataset)
            else:
                response = assoc.send_c_store(path)
            if "Status" not in response:
                raise DeliveryError(f"{destination.label} gave no answer to the C-STORE of {path.name}")
            statuses.append(int(response.Status))
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    return statuses


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one delivery attempt came to: sent, retry (in `retry_in` seconds), failed or skipped."""

    outbox_id: int
    state: str
    retry_in: float | None = None
    detail: str = ""


def find_destination(settings: Settings, label: str) -> Destination | DicomwebDestination | None:
    return next((d for d in settings.destinations if d.label == label), None)


def _is_warning(status: int) -> bool:
    return code_to_category(status) == STATUS_WARNING


def deliver_outbox_entry(
    ledger: Ledger,
    store: InstanceStore,
    settings: Settings,
    outbox_id: int,
    *,
    now: datetime | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    sender: Callable[..., list[int]] | None = None,
) -> DeliveryOutcome:
    """Try one outbox row once and record the outcome.

    A row that is already sent or failed, or not yet due (a duplicate message), is skipped. The
    sender is the destination kind's (C-STORE or STOW-RS) unless `sender` is given.
    """
    answered_at = now  # a clock given for the whole attempt (tests); else read when the answer came
    now = now or utcnow()
    entry = ledger.claim_outbox(outbox_id, now=now, lease_seconds=lease_seconds)
    if entry is None:
        current = ledger.outbox_entry(outbox_id)
        detail = "no such outbox row" if current is None else f"row is {current.status}, not due now"
        return DeliveryOutcome(outbox_id, "skipped", detail=detail)

    destination = find_destination(settings, entry.destination)
    if destination is None:
        reason = f"destination {entry.destination} is no longer in PLEURA_DESTINATIONS"
        ledger.mark_outbox_failed(outbox_id, reason, now=now)
        log.error("outbox %d: %s", outbox_id, reason)
        return DeliveryOutcome(outbox_id, "failed", detail=reason)

    dicomweb = isinstance(destination, DicomwebDestination)
    calling_ae = settings.ae_title if dicomweb else destination.calling_ae_title or settings.ae_title
    describe = describe_reason if dicomweb else describe_status
    error: str | None = None
    warning: str | None = None
    permanent = False
    try:
        path = store.path(entry.result_storage_key)
        send = sender or (stow_results if dicomweb else send_results)
        statuses = send(destination, calling_ae, [path], None if dicomweb else client_context(settings, destination))
        failed = [s for s in statuses if not is_success(s)]
        if failed:
            error = f"{destination.label} answered 0x{failed[0]:04X} ({describe(failed[0])})"
            permanent = is_permanent_reason(failed[0]) if dicomweb else is_permanent_failure(failed[0])
        warned = [s for s in statuses if _is_warning(s)]
        if warned:
            warning = f"{destination.label} stored it with warning 0x{warned[0]:04X} ({describe(warned[0])})"
    except Exception as exc:  # any failure counts as an attempt, so a row always ends sent or failed
        # A DeliveryError, StowError or AuthError is meant to be read as it is, and says whether
        # the refusal is for good.
        error = str(exc) if isinstance(exc, PleuraError) else f"{type(exc).__name__}: {exc}"
        permanent = bool(getattr(exc, "permanent", False))

    if error is None:
        # Sent when the destination answered (the time to flag ends there), not when the attempt began.
        ledger.record_delivery_success(outbox_id, now=answered_at or utcnow(), response=warning)
        if warning:
            log.warning("sent %s %s: %s", entry.result_kind, ref(entry.result_uid), warning)
        log.info("sent %s %s to %s", entry.result_kind, ref(entry.result_uid), destination.label)
        AuditTrail(settings.storage_dir).record(
            "result-sent", destination=destination.label, kind=entry.result_kind, study_uid=entry.study_uid,
            sop_instance_uid=entry.result_uid, calling_ae=calling_ae,
        )
        return DeliveryOutcome(outbox_id, "sent")

    if permanent:
        error = f"permanent refusal, not retried: {error}"
    view = ledger.record_delivery_failure(
        outbox_id,
        error,
        retry_seconds=settings.export_retry_seconds,
        max_attempts=1 if permanent else destination.max_attempts,
        now=now,
    )
    if view.status == OutboxStatus.FAILED:
        log.error(
            "giving up sending %s %s to %s after %d attempts: %s",
            entry.result_kind,
            ref(entry.result_uid),
            destination.label,
            view.attempts,
            error,
        )
        return DeliveryOutcome(outbox_id, "failed", detail=error)
    assert view.next_attempt_at is not None
    retry_in = max((view.next_attempt_at - now).total_seconds(), 0.0)
    log.warning(
        "sending %s %s to %s failed (attempt %d of %d), next try in %.0f s: %s",
        entry.result_kind,
        ref(entry.result_uid),
        destination.label,
        view.attempts,
        destination.max_attempts,
        retry_in,
        error,
    )
    return DeliveryOutcome(outbox_id, "retry", retry_in=retry_in, detail=error)
