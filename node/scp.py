"""The DICOM SCP: C-ECHO and C-STORE of every Storage SOP class a PACS may push.

The C-STORE handler is small on purpose: pynetdicom receives the data set to a temporary file in
chunks (so memory stays flat whatever the instance size); the handler reads the few UIDs it needs
from that file (no large value read, no pixel decoding), moves the file durably into storage,
records the instance in the ledger and only then answers success. An instance larger than
``max_instance_bytes`` is answered "Out of Resources"; one whose elements declare more bytes than
arrived is refused. What cannot be accepted is kept in quarantine with the reason, and the sender gets
a failure status from PS3.4 Annex B; a storage or ledger error answers "Out of Resources", so the
sender keeps the instance and tries again.

Only radiographs (CR, DX) and CT images are analysed. A PACS pushes whole studies, though, with
reports, presentation states and other modalities' images in them, and refusing one object makes
many senders give up the whole study (Orthanc answers HTTP 500, storescu stops at the first
refusal). So every other public Storage SOP class is accepted, acknowledged and recorded as skipped
with the reason, kept on disk or discarded (setting ``keep_unanalysed_objects``), and never
analysed; it never re-opens an analysed study. Pleura's own results coming back (a PACS routing the
study back) are acknowledged and neither kept nor recorded again.

A Segmentation (SEG) is not analysed: it is a radiologist's outline sent back to Pleura, stored
like an instance and recorded as labels for the images it references (:mod:`node.seg_labels`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from weakref import WeakKeyDictionary

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from node.admission import Admission, NodeAE
from node.audit import AuditTrail
from node.connections import Limits, Refused
from node.ledger import Held, Ledger
from node.listening import listen_error
from node.ops.metrics import IDENTITY_CONFLICTS, INSTANCES_RECEIVED
from node.privacy import ref
from node.seg_labels import SEG_TRANSFER_SYNTAXES, SEGMENTATION_SOP_CLASS, SegLabelError, is_pleura_seg, read_seg_labels
from node.storage import InstanceStore, InvalidUIDError, validate_uid
from node.tls import server_context
from worker.writers.marks import MANUFACTURER

log = logging.getLogger(__name__)

ANALYSED_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    CTImageStorage,
)
"""The images Pleura analyses; every other Storage SOP class is accepted and recorded as skipped."""

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,  # 1.2.840.10008.1.2.4.57
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,  # 1.2.840.10008.1.2.4.201
    HTJ2KLosslessRPCL,  # 1.2.840.10008.1.2.4.202
    HTJ2K,  # 1.2.840.10008.1.2.4.203
    RLELossless,
)
"""Accepted for every Storage SOP class but Segmentation: the ones the worker decodes (pydicom with
the pylibjpeg plugins: libjpeg for JPEG and JPEG-LS, openjpeg for JPEG 2000 and HTJ2K, rle)."""


def sop_class_name(sop_class_uid: str) -> str:
    """The SOP class in words, for reasons people read (never the UID itself)."""
    name = UID(sop_class_uid).name
    return "an object of this SOP class" if name == str(sop_class_uid) else name


def skipped_reason(sop_class_uid: str) -> str:
    """Why an object of this SOP class is recorded but not analysed."""
    return f"{sop_class_name(sop_class_uid)} is not an image Pleura analyses"

# C-STORE response statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PRIORITY_HIGH = 0x0001
"""The C-STORE request's Priority (0000,0700) HIGH (PS3.7 9.1.1.1): the study is urgent."""
IDENTITY_CONFLICT = 0xC001
"""A "cannot understand" status (PS3.4 B.2.3 leaves 0xCxxx to the SCP): the data set claims a SOP
Instance or Study UID that the node holds for another study or patient."""

_ERROR_COMMENT_LENGTH = 64  # Error Comment is LO


class RejectedInstance(Exception):
    """An instance the node will not accept; carries the C-STORE status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return status


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    return str(value).strip() or None


_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
_DEFER_BYTES = 64 * 1024
"""Values larger than this are skipped (seeked over), never read, when the header is read."""


def read_header(path: Path, transfer_syntax: str) -> Dataset:
    """The attributes of a received file up to its pixel data, without reading large values.

    Raises :class:`RejectedInstance` when an element (the pixel data included) declares more bytes
    than the file holds: a data set cut short is refused, not stored.
    """
    size = path.stat().st_size
    pixels: dict[str, Any] = {}

    def at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_DATA_TAGS:
            pixels.update(vr=vr, length=length)
            return True
        return False

    with open(path, "rb") as handle:
        dataset = read_partial(handle, stop_when=at_pixel_data, defer_size=_DEFER_BYTES)
        position = handle.tell()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return dataset  # positions are in the inflated stream: what arrived is checked by inflating
    end = position
    if pixels and pixels["length"] != 0xFFFFFFFF:
        implicit = transfer_syntax == ImplicitVRLittleEndian
        end += 8 + (4 if not implicit and pixels["vr"] in EXPLICIT_VR_LENGTH_32 else 0) + pixels["length"]
    if end > size:
        raise RejectedInstance(
            CANNOT_UNDERSTAND, f"an element declares {end - size} bytes more than the data set holds (cut short)"
        )
    return dataset


def build_ae(settings: Settings, admission: Admission | None = None, on_refused: Refused | None = None) -> NodeAE:
    """The node's application entity with the contexts it accepts as an SCP and its admission
    rules (calling-AE allowlist, association limits, free-space guard, timeouts and deadlines);
    `on_refused` hears of each connection refused or dropped."""
    ae = NodeAE(settings.ae_title, admission or Admission(settings), Limits.from_settings(settings), on_refused)
    ae.require_called_aet = True
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        sop_class = str(context.abstract_syntax)
        syntaxes = SEG_TRANSFER_SYNTAXES if sop_class == SEGMENTATION_SOP_CLASS else TRANSFER_SYNTAXES
        ae.add_supported_context(sop_class, list(syntaxes))
    return ae


class StorageSCP:
    """C-ECHO and C-STORE SCP that stores durably and records in the ledger."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        store: InstanceStore,
        admission: Admission | None = None,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        # Told when an association that stored instances was released normally (the settle loop
        # wakes: their study may be due after the grace).
        self.on_released = on_released
        # The ledger's id of each association that stored something (node/ledger Association).
        self._association_ids: WeakKeyDictionary[Association, str] = WeakKeyDictionary()
        self.ledger = ledger
        self.store = store
        self.admission = admission or Admission(settings)
        self.audit = AuditTrail(settings.storage_dir)
        self.ae = build_ae(settings, self.admission, self._audit_connection)
        self._rejected: WeakKeyDictionary[Association, int] = WeakKeyDictionary()  # rejected instances per association
        self._server: ThreadedAssociationServer | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen on settings.host:settings.port in background threads."""
        if self._server is not None:
            return
        # C-STOREs are received to a temporary file in chunks, never held in memory (pynetdicom's
        # documented switch; it is process-wide, and pynetdicom's other handlers read such files too).
        _config.STORE_RECV_CHUNKED_DATASET = True
        try:
            self._server = self.ae.start_server(
                (self.settings.host, self.settings.port),
                block=False,
                ssl_context=server_context(self.settings),
                evt_handlers=[
                    (evt.EVT_C_STORE, self.handle_store),
                    (evt.EVT_C_ECHO, self.handle_echo),
                    (evt.EVT_ESTABLISHED, self._audit_association),
                    (evt.EVT_REJECTED, self._audit_association),
                    (evt.EVT_RELEASED, self._association_ended),
                    (evt.EVT_ABORTED, self._association_ended),
                    (evt.EVT_CONN_CLOSE, self._association_ended),
                ],
            )
        except OSError as exc:
            raise listen_error(
                "the DICOM service", self.settings.host, self.settings.port, "PLEURA_PORT (PLEURA_HOST)", exc
            ) from exc
        log.info(
            "DICOM SCP %s listening on %s:%d%s",
            self.settings.ae_title,
            self.settings.host,
            self.settings.port,
            " (DICOM TLS)" if self.settings.tls else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("DICOM SCP stopped")

    def _audit_connection(self, what: str, address: str, reason: str) -> None:
        self.audit.record(what, address=address, reason=reason, tls=self.settings.tls)

    def _audit_association(self, event: Event) -> None:
        requestor = event.assoc.requestor
        self.audit.record(
            "association-accepted" if event.event is evt.EVT_ESTABLISHED else "association-rejected",
            calling_ae=requestor.ae_title.strip(),
            address=requestor.address,
            tls=self.settings.tls,
        )

    def _association_id(self, event: Event) -> str:
        """The ledger's id of the event's association, recorded at its first stored instance."""
        association_id = self._association_ids.get(event.assoc)
        if association_id is None:
            association_id = str(uuid.uuid4())
            self.ledger.open_association(association_id, event.assoc.requestor.ae_title)
            self._association_ids[event.assoc] = association_id
        return association_id

    def _association_ended(self, event: Event) -> None:
        """Record how an association that stored instances ended: released normally (A-RELEASE),
        or aborted or dropped, which makes no study due early."""
        association_id = self._association_ids.get(event.assoc)
        if association_id is None:
            return
        released = event.event is evt.EVT_RELEASED or (
            event.event is evt.EVT_CONN_CLOSE and bool(event.assoc.is_released)
        )
        try:
            now_released = self.ledger.end_association(association_id, released=released)
        except Exception as exc:  # the study then settles on the quiet time
            log.warning("cannot record the end of an association from %s: %s", event.assoc.requestor.ae_title, exc)
            return
        if now_released and self.on_released is not None:
            self.on_released()

    def _urgent(self, event: Event) -> bool:
        """Whether the sender marked this instance urgent: Priority HIGH, or a STAT calling AE."""
        priority = getattr(cast(C_STORE, event.request), "Priority", None)
        calling_ae = event.assoc.requestor.ae_title.strip()
        return priority == PRIORITY_HIGH or calling_ae in self.settings.stat_calling_aes

    def handle_echo(self, event: Event) -> int:
        log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def handle_store(self, event: Event) -> Dataset:
        calling_ae = event.assoc.requestor.ae_title
        try:
            # Received to disk in chunks (STORE_RECV_CHUNKED_DATASET): the file meta pynetdicom
            # wrote from the command set and context, then the data set's bytes as they arrived.
            data = event.dataset_path
        except AttributeError:
            data = None
        if data is None or not Path(data).is_file():  # the request carried no dataset at all
            log.warning("C-STORE from %s without a usable dataset", calling_ae)
            return _status(CANNOT_UNDERSTAND, "no data set in the C-STORE request")
        data = Path(data)
        size = data.stat().st_size
        if size > self.settings.max_instance_bytes:
            reason = (
                f"data set of {size} bytes is larger than PLEURA_MAX_INSTANCE_BYTES ({self.settings.max_instance_bytes})"
            )
            log.error("refusing an instance from %s: %s", calling_ae, reason)
            self._audit_instance(event, "instance-refused", None, OUT_OF_RESOURCES, reason)
            return _status(OUT_OF_RESOURCES, "larger than PLEURA_MAX_INSTANCE_BYTES")
        try:
            identity, manufacturer = self._identify(event, data)
        except RejectedInstance as rejected:
            return self._quarantine(event, data, rejected)

        if identity["sop_class_uid"] == SEGMENTATION_SOP_CLASS:
            return self._receive_segmentation(event, data, identity)
        if identity["sop_class_uid"] not in ANALYSED_SOP_CLASSES:
            return self._receive_unanalysed(event, data, identity, manufacturer)
        sop_uid = identity["sop_instance_uid"]
        try:
            conflict = self.ledger.identity_conflict(sop_uid, identity["study_uid"], identity.get("patient_id"))
        except Exception as exc:
            return self._not_stored(event, identity, exc)
        if conflict is not None:
            return self._identity_conflict(event, data, identity, conflict)
        try:
            if self.ledger.has_instance(sop_uid):
                log.info("instance %s from %s already received; not stored again", ref(sop_uid), calling_ae)
                self._audit_instance(event, "instance-repeated", identity, SUCCESS)
                return _status(SUCCESS)
            full = self.admission.disk_refusal()
            if full is not None:
                log.error("refusing instance %s from %s: %s", ref(sop_uid), calling_ae, full)
                self._audit_instance(event, "instance-refused", identity, OUT_OF_RESOURCES, full)
                return _status(OUT_OF_RESOURCES, "disk nearly full; try again later")
            key = self.store.store_file(identity["study_uid"], identity["series_instance_uid"], sop_uid, data)
            created = self.ledger.record_instance(
                storage_key=key,
                calling_ae=calling_ae,
                association_id=self._association_id(event),
                urgent=self._urgent(event),
                **identity,
            )
        except Exception as exc:
            return self._not_stored(event, identity, exc)
        log.info(
            "stored instance %s of study %s from %s%s",
            ref(sop_uid),
            ref(identity["study_uid"]),
            calling_ae,
            "" if created else " (already recorded)",
        )
        self._audit_instance(event, "instance-stored", identity, SUCCESS)
        INSTANCES_RECEIVED.inc()
        return _status(SUCCESS)

    def _identity_conflict(self, event: Event, data: Path, identity: dict[str, Any], conflict: str) -> Dataset:
        """Refuse an image that claims an identity the ledger holds for another study or patient:
        kept in quarantine with the reason (nothing is lost; the sender also keeps it, having had
        a failure status), audited and counted (``pleura_identity_conflicts_total``) so the PACS
        team sees it and corrects the data at its source."""
        log.warning(
            "refusing instance %s of study %s from %s: %s",
            ref(identity["sop_instance_uid"]), ref(identity["study_uid"]), event.assoc.requestor.ae_title, conflict,
        )
        self._audit_instance(event, "identity-conflict", identity, IDENTITY_CONFLICT, conflict)
        IDENTITY_CONFLICTS.inc()
        return self._quarantine(event, data, RejectedInstance(IDENTITY_CONFLICT, f"identity conflict: {conflict}"))

    def _receive_unanalysed(
        self, event: Event, data: Path, identity: dict[str, Any], manufacturer: str | None
    ) -> Dataset:
        """Acknowledge an object Pleura does not analyse (a report, a presentation state, another
        modality's image) and record it as skipped with the reason, so that a PACS can push a whole
        study; kept on disk or not per ``keep_unanalysed_objects``.

        Pleura's own result coming back (its Manufacturer, or a SOP Instance UID the ledger holds
        as a result) is acknowledged and neither kept nor recorded: a PACS routing a study back
        with Pleura's results must not start another analysis.
        """
        calling_ae = event.assoc.requestor.ae_title
        sop_uid = identity["sop_instance_uid"]
        kind = sop_class_name(identity["sop_class_uid"])
        if manufacturer == MANUFACTURER:
            return self._own_result(event, identity, kind)
        reason = skipped_reason(identity["sop_class_uid"])
        keep = self.settings.keep_unanalysed_objects
        try:
            held = self.ledger.holds(sop_uid) if keep else None  # before writing a file for nothing
            key = ""
            if held is None and keep:
                full = self.admission.disk_refusal()
                if full is not None:
                    log.error("refusing instance %s from %s: %s", ref(sop_uid), calling_ae, full)
                    self._audit_instance(event, "instance-refused", identity, OUT_OF_RESOURCES, full)
                    return _status(OUT_OF_RESOURCES, "disk nearly full; try again later")
                key = self.store.store_file(identity["study_uid"], identity["series_instance_uid"], sop_uid, data)
            if held is None:
                held = self.ledger.record_skipped(
                    storage_key=key,
                    calling_ae=calling_ae,
                    reason=reason,
                    association_id=self._association_id(event),
                    **identity,
                )
        except Exception as exc:
            return self._not_stored(event, identity, exc)
        if held is Held.RESULT:
            return self._own_result(event, identity, kind)
        if held is Held.INSTANCE:
            log.info("instance %s from %s already received; not stored again", ref(sop_uid), calling_ae)
            self._audit_instance(event, "instance-repeated", identity, SUCCESS)
            return _status(SUCCESS)
        log.info(
            "%s instance %s of study %s from %s: %s",
            "stored" if keep else "recorded (not kept)",
            ref(sop_uid),
            ref(identity["study_uid"]),
            calling_ae,
            reason,
        )
        self._audit_instance(event, "instance-stored" if keep else "instance-discarded", identity, SUCCESS, reason)
        INSTANCES_RECEIVED.inc()
        return _status(SUCCESS)

    def _own_result(self, event: Event, identity: dict[str, Any], kind: str) -> Dataset:
        log.info(
            "%s %s from %s is Pleura's own result; not stored again",
            kind,
            ref(identity["sop_instance_uid"]),
            event.assoc.requestor.ae_title,
        )
        self._audit_instance(event, "instance-repeated", identity, SUCCESS, f"Pleura's own {kind}")
        return _status(SUCCESS)

    def _not_stored(self, event: Event, identity: dict[str, Any], exc: Exception) -> Dataset:
        """The answer when an instance could not be stored or recorded: not kept here, so the sender
        must keep it, with a status it retries on."""
        sop_uid, calling_ae = identity["sop_instance_uid"], event.assoc.requestor.ae_title
        if isinstance(exc, (OSError, SQLAlchemyError)):
            log.error("cannot store instance %s from %s: %s", ref(sop_uid), calling_ae, exc)
            self._audit_instance(event, "instance-refused", identity, OUT_OF_RESOURCES, str(exc))
            return _status(OUT_OF_RESOURCES, "storage or ledger unavailable; try again")
        log.error("unexpected error storing instance %s from %s", ref(sop_uid), calling_ae, exc_info=exc)
        self._audit_instance(event, "instance-refused", identity, OUT_OF_RESOURCES, repr(exc))
        return _status(OUT_OF_RESOURCES, "internal error; try again")

    def _receive_segmentation(self, event: Event, data: Path, identity: dict[str, Any]) -> Dataset:
        """Store a SEG sent back and record it as labels of the images it references; Pleura's own
        SEG coming back is acknowledged and not kept again, an unreadable one is quarantined."""
        calling_ae = event.assoc.requestor.ae_title
        sop_uid = identity["sop_instance_uid"]
        try:
            if self.ledger.is_result(sop_uid) or self.ledger.has_seg_labels(sop_uid):
                log.info("Segmentation %s from %s already held; not stored again", ref(sop_uid), calling_ae)
                self._audit_instance(event, "instance-repeated", identity, SUCCESS)
                return _status(SUCCESS)
            try:
                dataset = dcmread(data)  # a SEG's frames are its labels: read whole (1 bit a pixel)
                own = is_pleura_seg(dataset)
                read = None if own else read_seg_labels(dataset)
            except SegLabelError as exc:
                return self._quarantine(event, data, RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"SEG: {exc}"))
            except Exception as exc:  # pydicom raises many kinds of errors on malformed data
                return self._quarantine(
                    event, data, RejectedInstance(CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}")
                )
            if read is None:
                log.info("Segmentation %s from %s is Pleura's own result; not a label", ref(sop_uid), calling_ae)
                self._audit_instance(event, "instance-repeated", identity, SUCCESS, "Pleura's own SEG")
                return _status(SUCCESS)
            full = self.admission.disk_refusal()
            if full is not None:
                self._audit_instance(event, "instance-refused", identity, OUT_OF_RESOURCES, full)
                return _status(OUT_OF_RESOURCES, "disk nearly full; try again later")
            key = self.store.store_file(identity["study_uid"], identity["series_instance_uid"], sop_uid, data)
            self.ledger.record_seg_labels(
                seg_sop_instance_uid=sop_uid,
                seg_study_uid=identity["study_uid"],
                storage_key=key,
                calling_ae=calling_ae,
                labels=[(label.sop_instance_uid, label.positive) for label in read.labels],
            )
        except Exception as exc:
            return self._not_stored(event, identity, exc)
        outcome = (
            f"labels {len(read.labels)} image(s), {sum(label.positive for label in read.labels)} outlined"
            if read.labels
            else f"labels nothing: {read.why_none}"
        )
        log.info("stored Segmentation %s from %s; it %s", ref(sop_uid), calling_ae, outcome)
        self._audit_instance(event, "instance-stored", identity, SUCCESS, f"Segmentation {outcome}")
        return _status(SUCCESS)

    def _audit_instance(
        self, event: Event, what: str, identity: dict[str, Any] | None, status: int, reason: str | None = None
    ) -> None:
        identity = identity or {}
        self.audit.record(
            what,
            calling_ae=event.assoc.requestor.ae_title.strip(),
            address=event.assoc.requestor.address,
            study_uid=identity.get("study_uid"),
            sop_instance_uid=identity.get("sop_instance_uid") or str(
                cast(C_STORE, event.request).AffectedSOPInstanceUID or ""
            ),
            sop_class_uid=str(event.context.abstract_syntax),
            status=f"0x{status:04X}",
            reason=reason,
        )

    def _identify(self, event: Event, data: Path) -> tuple[dict[str, Any], str | None]:
        """The UIDs and identifiers the ledger needs, and the Manufacturer (which marks Pleura's
        own results), read from the received file without loading large values or decoding the
        pixel data."""
        context_sop_class = str(event.context.abstract_syntax)
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            dataset = read_header(data, transfer_syntax)
            dataset_sop_class = dataset.get("SOPClassUID")
            sop_uid = validate_uid(dataset.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)")
            study_uid = validate_uid(dataset.get("StudyInstanceUID"), "Study Instance UID (0020,000D)")
            series_uid = validate_uid(dataset.get("SeriesInstanceUID"), "Series Instance UID (0020,000E)")
            patient_id = _text(dataset, "PatientID")
            accession = _text(dataset, "AccessionNumber")
            manufacturer = _text(dataset, "Manufacturer")
        except (InvalidUIDError, RejectedInstance) as exc:
            raise RejectedInstance(CANNOT_UNDERSTAND, str(exc)) from None
        except Exception as exc:  # pydicom raises many kinds of errors on malformed data
            raise RejectedInstance(CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from None

        if dataset_sop_class is None or str(dataset_sop_class).rstrip("\x00 ") != context_sop_class:
            raise RejectedInstance(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOP Class UID (0008,0016) {dataset_sop_class!s} does not match the presentation "
                f"context's {context_sop_class}",
            )
        affected = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")
        if affected and affected != sop_uid:
            raise RejectedInstance(
                CANNOT_UNDERSTAND,
                f"Affected SOP Instance UID {affected} differs from the data set's SOP Instance UID {sop_uid}",
            )
        identity = {
            "sop_instance_uid": sop_uid,
            "study_uid": study_uid,
            "series_instance_uid": series_uid,
            "sop_class_uid": context_sop_class,
            "transfer_syntax_uid": transfer_syntax,
            "patient_id": patient_id,
            "accession_number": accession,
        }
        return identity, manufacturer

    def _quarantine(self, event: Event, data: Path, rejected: RejectedInstance) -> Dataset:
        """Keep a rejected instance with its reason, within bounds: under the free-space guard, in a
        folder of at most ``quarantine_max_mb`` (the oldest removed first, each removal audited),
        and at most ``max_rejected_per_association`` from one association, which is aborted at the
        next."""
        calling_ae = event.assoc.requestor.ae_title
        rejected_here = self._rejected.get(event.assoc, 0) + 1
        self._rejected[event.assoc] = rejected_here
        if rejected_here > self.settings.max_rejected_per_association:
            why = (
                f"more than {self.settings.max_rejected_per_association} rejected instances in one association "
                "(PLEURA_MAX_REJECTED_PER_ASSOCIATION)"
            )
            log.error("aborting the association from %s: %s", calling_ae, why)
            self._audit_instance(event, "instance-refused", None, rejected.status, f"{rejected.reason} (not kept: {why})")
            self.audit.record(
                "association-aborted", calling_ae=calling_ae.strip(), address=event.assoc.requestor.address, reason=why
            )
            event.assoc.abort()
            return _status(rejected.status, rejected.reason)
        full = self.admission.disk_refusal()
        if full is not None:
            log.error("cannot quarantine a rejected instance from %s: %s", calling_ae, full)
            self._audit_instance(event, "instance-refused", None, OUT_OF_RESOURCES, f"cannot quarantine: {full}")
            return _status(OUT_OF_RESOURCES, "disk nearly full; try again later")
        reason = "\n".join(
            (
                rejected.reason,
                f"status: 0x{rejected.status:04X}",
                f"calling AE: {calling_ae}",
                f"affected SOP class: {event.context.abstract_syntax}",
                f"affected SOP instance: {cast(C_STORE, event.request).AffectedSOPInstanceUID}",
                f"transfer syntax: {event.context.transfer_syntax}",
            )
        )
        try:
            path = self.store.quarantine(data, reason)
            removed = self.store.trim_quarantine(self.settings.quarantine_max_mb * 1_000_000)
        except OSError as exc:
            # Not kept here, so the sender must keep it: answer a status it retries on.
            log.error("cannot quarantine a rejected instance from %s: %s", calling_ae, exc)
            self._audit_instance(event, "instance-refused", None, OUT_OF_RESOURCES, "cannot quarantine")
            return _status(OUT_OF_RESOURCES, "cannot keep the rejected data set; try again")
        # The reason may quote UIDs: the log names the quarantine file, which holds it.
        log.warning("rejected an instance from %s with status 0x%04X; kept in %s", calling_ae, rejected.status, path)
        self._audit_instance(event, "instance-refused", None, rejected.status, f"{rejected.reason} (kept in {path.name})")
        for old in removed:
            log.warning("removed %s from the quarantine (PLEURA_QUARANTINE_MAX_MB is %d)", old.name,
                        self.settings.quarantine_max_mb)
            self.audit.record("quarantine-removed", file=old.name,
                              reason=f"quarantine over PLEURA_QUARANTINE_MAX_MB ({self.settings.quarantine_max_mb})")
        return _status(rejected.status, rejected.reason)
