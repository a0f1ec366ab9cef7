"""One instance received, whatever carried it: a C-STORE (``node/scp.py``) or a part of a STOW-RS
request (``node/api/routers/dicomweb.py``). The promise is the same for both: success is answered
only once the bytes are on disk (fsync + rename) and the instance is in the ledger.

:class:`Receiver` takes an :class:`Arrival` (the received file and what the transport says of it)
and answers a PS3.4 Annex B status (:class:`Answer`). It reads the few UIDs it needs without
decoding pixel data, refuses what is too large, what cannot be parsed or claims another study's
identity (kept in quarantine with the reason, at most ``max_rejected_per_association`` from one
association or request), records objects Pleura does not analyse as skipped, Segmentations as
labels, and Pleura's own results coming back as nothing new. A storage or ledger error answers
"Out of Resources", so the sender keeps the instance and tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from node.admission import Admission
from node.audit import AuditTrail
from node.ledger import Held, Ledger
from node.ops.metrics import IDENTITY_CONFLICTS, INSTANCES_RECEIVED
from node.privacy import ref
from node.seg_labels import SEGMENTATION_SOP_CLASS, SegLabelError, is_pleura_seg, read_seg_labels
from node.storage import InstanceStore, InvalidUIDError, validate_uid
from contract.marks import MANUFACTURER

log = logging.getLogger(__name__)

ANALYSED_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    CTImageStorage,
)
"""The images Pleura analyses; every other Storage SOP class is accepted and recorded as skipped."""

# Statuses (PS3.4 B.2.3; STOW-RS answers them as Failure Reasons, PS3.18 I.2).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
IDENTITY_CONFLICT = 0xC001
"""A "cannot understand" status (PS3.4 B.2.3 leaves 0xCxxx to the SCP): the data set claims a SOP
Instance or Study UID that the node holds for another study or patient."""


def sop_class_name(sop_class_uid: str) -> str:
    """The SOP class in words, for reasons people read (never the UID itself)."""
    name = UID(sop_class_uid).name
    return "an object of this SOP class" if name == str(sop_class_uid) else name


def skipped_reason(sop_class_uid: str) -> str:
    """Why an object of this SOP class is recorded but not analysed."""
    return f"{sop_class_name(sop_class_uid)} is not an image Pleura analyses"


class RejectedInstance(Exception):
    """An instance the node will not accept; carries the status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    """What the sender is told of one instance: a status and, for a refusal, why."""

    status: int
    comment: str | None = None
    sop_instance_uid: str | None = None  # the data set's, once it was read
    sop_class_uid: str | None = None

    @property
    def stored(self) -> bool:
        """Success: the instance is held (stored now or before, or one of Pleura's own)."""
        return self.status == SUCCESS


@dataclass(frozen=True)
class Arrival:
    """One received instance and what its transport says of it.

    ``batch`` is the association (or STOW-RS request) it came in, which counts the instances
    rejected in it; ``abort`` ends that batch when too many were.
    """

    data: Path  # a DICOM Part 10 file, received to disk
    calling_ae: str  # the calling AE title, or the API user who sent it by STOW-RS
    address: str
    sop_class_uid: str  # the presentation context's, or the file meta's Media Storage SOP Class
    transfer_syntax_uid: str
    affected_sop_instance_uid: str
    batch: Any
    abort: Callable[[], None] | None = None
    via: str = "dimse"  # or "stow-rs"
    # The ledger's id of the DIMSE association, asked for when an instance is recorded (the
    # association is recorded at its first one): its release can make the study due early.
    association_id: Callable[[], str] | None = None
    urgent: bool = False  # the sender marked it urgent (C-STORE Priority HIGH, a STAT calling AE)


def _association(arrival: Arrival) -> str | None:
    return arrival.association_id() if arrival.association_id is not None else None


_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
_DEFER_BYTES = 64 * 1024
"""Values larger than this are skipped (seeked over), never read, when the header is read."""


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    return str(value).strip() or None


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


class Receiver:
    """Stores and records what arrives, and says what to answer."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        store: InstanceStore,
        admission: Admission | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store = store
        self.admission = admission or Admission(settings)
        self.audit = audit or AuditTrail(settings.storage_dir)
        self._rejected: WeakKeyDictionary[Any, int] = WeakKeyDictionary()  # rejected instances per batch

    def receive(self, arrival: Arrival) -> Answer:
        data = arrival.data
        size = data.stat().st_size
        if size > self.settings.max_instance_bytes:
            reason = (
                f"data set of {size} bytes is larger than PLEURA_MAX_INSTANCE_BYTES ({self.settings.max_instance_bytes})"
            )
            log.error("refusing an instance from %s: %s", arrival.calling_ae, reason)
            self._audit_instance(arrival, "instance-refused", None, OUT_OF_RESOURCES, reason)
            return Answer(OUT_OF_RESOURCES, "larger than PLEURA_MAX_INSTANCE_BYTES")
        try:
            identity, manufacturer = self._identify(arrival)
        except RejectedInstance as rejected:
            return self._quarantine(arrival, rejected)
        answer = self._receive_identified(arrival, identity, manufacturer)
        return Answer(answer.status, answer.comment, identity["sop_instance_uid"], identity["sop_class_uid"])

    def refuse(self, arrival: Arrival, status: int, reason: str, *, keep: bool = True) -> Answer:
        """Refuse what arrived before it could be read as an instance (a STOW-RS part that is no
        Part 10 file, say): kept in quarantine with the reason, or, with ``keep=False`` (a part
        over the size limit, a transfer syntax not accepted), audited and dropped."""
        if keep:
            return self._quarantine(arrival, RejectedInstance(status, reason))
        log.warning("refused an instance from %s with status 0x%04X: %s", arrival.calling_ae, status, reason)
        self._audit_instance(arrival, "instance-refused", None, status, reason)
        arrival.data.unlink(missing_ok=True)
        return Answer(status, reason)

    def _receive_identified(self, arrival: Arrival, identity: dict[str, Any], manufacturer: str | None) -> Answer:
        if identity["sop_class_uid"] == SEGMENTATION_SOP_CLASS:
            return self._receive_segmentation(arrival, identity)
        if identity["sop_class_uid"] not in ANALYSED_SOP_CLASSES:
            return self._receive_unanalysed(arrival, identity, manufacturer)
        sop_uid, calling_ae = identity["sop_instance_uid"], arrival.calling_ae
        try:
            conflict = self.ledger.identity_conflict(sop_uid, identity["study_uid"], identity.get("patient_id"))
        except Exception as exc:
            return self._not_stored(arrival, identity, exc)
        if conflict is not None:
            return self._identity_conflict(arrival, identity, conflict)
        try:
            if self.ledger.has_instance(sop_uid):
                log.info("instance %s from %s already received; not stored again", ref(sop_uid), calling_ae)
                self._audit_instance(arrival, "instance-repeated", identity, SUCCESS)
                return Answer(SUCCESS)
            full = self._disk_full(arrival, identity)
            if full is not None:
                return full
            key = self.store.store_file(identity["study_uid"], identity["series_instance_uid"], sop_uid, arrival.data)
            created = self.ledger.record_instance(
                storage_key=key, calling_ae=calling_ae[:16], association_id=_association(arrival),
                urgent=arrival.urgent, **identity,
            )
        except Exception as exc:
            return self._not_stored(arrival, identity, exc)
        log.info(
            "stored instance %s of study %s from %s%s%s",
            ref(sop_uid),
            ref(identity["study_uid"]),
            calling_ae,
            " by STOW-RS" if arrival.via == "stow-rs" else "",
            "" if created else " (already recorded)",
        )
        self._audit_instance(arrival, "instance-stored", identity, SUCCESS)
        INSTANCES_RECEIVED.inc()
        return Answer(SUCCESS)

    def _identity_conflict(self, arrival: Arrival, identity: dict[str, Any], conflict: str) -> Answer:
        """Refuse an image that claims an identity the ledger holds for another study or patient:
        kept in quarantine with the reason (nothing is lost; the sender also keeps it, having had
        a failure status), audited and counted (``pleura_identity_conflicts_total``) so the PACS
        team sees it and corrects the data at its source."""
        log.warning(
            "refusing instance %s of study %s from %s: %s",
            ref(identity["sop_instance_uid"]), ref(identity["study_uid"]), arrival.calling_ae, conflict,
        )
        self._audit_instance(arrival, "identity-conflict", identity, IDENTITY_CONFLICT, conflict)
        IDENTITY_CONFLICTS.inc()
        return self._quarantine(arrival, RejectedInstance(IDENTITY_CONFLICT, f"identity conflict: {conflict}"))

    def _receive_unanalysed(self, arrival: Arrival, identity: dict[str, Any], manufacturer: str | None) -> Answer:
        """Acknowledge an object Pleura does not analyse (a report, a presentation state, another
        modality's image) and record it as skipped with the reason, so that a PACS can push a whole
        study; kept on disk or not per ``keep_unanalysed_objects``.

        Pleura's own result coming back (its Manufacturer, or a SOP Instance UID the ledger holds
        as a result) is acknowledged and neither kept nor recorded: a PACS routing a study back
        with Pleura's results must not start another analysis.
        """
        calling_ae = arrival.calling_ae
        sop_uid = identity["sop_instance_uid"]
        kind = sop_class_name(identity["sop_class_uid"])
        if manufacturer == MANUFACTURER:
            return self._own_result(arrival, identity, kind)
        reason = skipped_reason(identity["sop_class_uid"])
        keep = self.settings.keep_unanalysed_objects
        try:
            held = self.ledger.holds(sop_uid) if keep else None  # before writing a file for nothing
            key = ""
            if held is None and keep:
                full = self._disk_full(arrival, identity)
                if full is not None:
                    return full
                key = self.store.store_file(identity["study_uid"], identity["series_instance_uid"], sop_uid, arrival.data)
            if held is None:
                held = self.ledger.record_skipped(
                    storage_key=key, calling_ae=calling_ae[:16], reason=reason,
                    association_id=_association(arrival), **identity,
                )
        except Exception as exc:
            return self._not_stored(arrival, identity, exc)
        if held is Held.RESULT:
            return self._own_result(arrival, identity, kind)
        if held is Held.INSTANCE:
            log.info("instance %s from %s already received; not stored again", ref(sop_uid), calling_ae)
            self._audit_instance(arrival, "instance-repeated", identity, SUCCESS)
            return Answer(SUCCESS)
        log.info(
            "%s instance %s of study %s from %s: %s",
            "stored" if keep else "recorded (not kept)",
            ref(sop_uid),
            ref(identity["study_uid"]),
            calling_ae,
            reason,
        )
        self._audit_instance(arrival, "instance-stored" if keep else "instance-discarded", identity, SUCCESS, reason)
        INSTANCES_RECEIVED.inc()
        return Answer(SUCCESS)

    def _disk_full(self, arrival: Arrival, identity: dict[str, Any]) -> Answer | None:
        """The refusal while the free-space guard holds (nothing is written), else None."""
        full = self.admission.disk_refusal()
        if full is None:
            return None
        log.error("refusing instance %s from %s: %s", ref(identity["sop_instance_uid"]), arrival.calling_ae, full)
        self._audit_instance(arrival, "instance-refused", identity, OUT_OF_RESOURCES, full)
        return Answer(OUT_OF_RESOURCES, "disk nearly full; try again later")

    def _own_result(self, arrival: Arrival, identity: dict[str, Any], kind: str) -> Answer:
        log.info(
            "%s %s from %s is Pleura's own result; not stored again",
            kind,
            ref(identity["sop_instance_uid"]),
            arrival.calling_ae,
        )
        self._audit_instance(arrival, "instance-repeated", identity, SUCCESS, f"Pleura's own {kind}")
        return Answer(SUCCESS)

    def _not_stored(self, arrival: Arrival, identity: dict[str, Any], exc: Exception) -> Answer:
        """The answer when an instance could not be stored or recorded: not kept here, so the sender
        must keep it, with a status it retries on."""
        sop_uid, calling_ae = identity["sop_instance_uid"], arrival.calling_ae
        if isinstance(exc, (OSError, SQLAlchemyError)):
            log.error("cannot store instance %s from %s: %s", ref(sop_uid), calling_ae, exc)
            self._audit_instance(arrival, "instance-refused", identity, OUT_OF_RESOURCES, str(exc))
            return Answer(OUT_OF_RESOURCES, "storage or ledger unavailable; try again")
        log.error("unexpected error storing instance %s from %s", ref(sop_uid), calling_ae, exc_info=exc)
        self._audit_instance(arrival, "instance-refused", identity, OUT_OF_RESOURCES, repr(exc))
        return Answer(OUT_OF_RESOURCES, "internal error; try again")

    def _receive_segmentation(self, arrival: Arrival, identity: dict[str, Any]) -> Answer:
        """Store a SEG sent back and record it as labels of the images it references; Pleura's own
        SEG coming back is acknowledged and not kept again, an unreadable one is quarantined."""
        calling_ae = arrival.calling_ae
        sop_uid = identity["sop_instance_uid"]
        try:
            if self.ledger.is_result(sop_uid) or self.ledger.has_seg_labels(sop_uid):
                log.info("Segmentation %s from %s already held; not stored again", ref(sop_uid), calling_ae)
                self._audit_instance(arrival, "instance-repeated", identity, SUCCESS)
                return Answer(SUCCESS)
            try:
                dataset = dcmread(arrival.data)  # a SEG's frames are its labels: read whole (1 bit a pixel)
                own = is_pleura_seg(dataset)
                read = None if own else read_seg_labels(dataset)
            except SegLabelError as exc:
                return self._quarantine(arrival, RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"SEG: {exc}"))
            except Exception as exc:  # pydicom raises many kinds of errors on malformed data
                return self._quarantine(
                    arrival, RejectedInstance(CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}")
                )
            if read is None:
                log.info("Segmentation %s from %s is Pleura's own result; not a label", ref(sop_uid), calling_ae)
                self._audit_instance(arrival, "instance-repeated", identity, SUCCESS, "Pleura's own SEG")
                return Answer(SUCCESS)
            full = self._disk_full(arrival, identity)
            if full is not None:
                return full
            key = self.store.store_file(identity["study_uid"], identity["series_instance_uid"], sop_uid, arrival.data)
            self.ledger.record_seg_labels(
                seg_sop_instance_uid=sop_uid,
                seg_study_uid=identity["study_uid"],
                storage_key=key,
                calling_ae=calling_ae[:16],
                labels=[(label.sop_instance_uid, label.positive) for label in read.labels],
            )
        except Exception as exc:
            return self._not_stored(arrival, identity, exc)
        outcome = (
            f"labels {len(read.labels)} image(s), {sum(label.positive for label in read.labels)} outlined"
            if read.labels
            else f"labels nothing: {read.why_none}"
        )
        log.info("stored Segmentation %s from %s; it %s", ref(sop_uid), calling_ae, outcome)
        self._audit_instance(arrival, "instance-stored", identity, SUCCESS, f"Segmentation {outcome}")
        return Answer(SUCCESS)

    def _audit_instance(
        self, arrival: Arrival, what: str, identity: dict[str, Any] | None, status: int, reason: str | None = None
    ) -> None:
        identity = identity or {}
        extra = {"via": arrival.via} if arrival.via != "dimse" else {}
        self.audit.record(
            what,
            calling_ae=arrival.calling_ae.strip(),
            address=arrival.address,
            study_uid=identity.get("study_uid"),
            sop_instance_uid=identity.get("sop_instance_uid") or arrival.affected_sop_instance_uid,
            sop_class_uid=arrival.sop_class_uid,
            status=f"0x{status:04X}",
            reason=reason,
            **extra,
        )

    def _identify(self, arrival: Arrival) -> tuple[dict[str, Any], str | None]:
        """The UIDs and identifiers the ledger needs, and the Manufacturer (which marks Pleura's
        own results), read from the received file without loading large values or decoding the
        pixel data."""
        context_sop_class = arrival.sop_class_uid
        transfer_syntax = arrival.transfer_syntax_uid
        try:
            dataset = read_header(arrival.data, transfer_syntax)
            dataset_sop_class = dataset.get("SOPClassUID")
            sop_uid = validate_uid(dataset.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)")
            study_uid = validate_uid(dataset.get("StudyInstanceUID"), "Study Instance UID (0020,000D)")
            series_instance_uid = validate_uid(dataset.get("SeriesInstanceUID"), "Series Instance UID (0020,000E)")
            patient_id = _text(dataset, "PatientID")
            accession = _text(dataset, "AccessionNumber")
            manufacturer = _text(dataset, "Manufacturer")
        except (InvalidUIDError, RejectedInstance) as exc:
            raise RejectedInstance(CANNOT_UNDERSTAND, str(exc)) from None
        except Exception as exc:  # pydicom raises many kinds of errors on malformed data
            raise RejectedInstance(CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from None

        if dataset_sop_class is None or str(dataset_sop_class).rstrip("\x00 ") != context_sop_class:
            where = "the presentation context's" if arrival.via == "dimse" else "the file meta's"
            raise RejectedInstance(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOP Class UID (0008,0016) {dataset_sop_class!s} does not match {where} {context_sop_class}",
            )
        affected = arrival.affected_sop_instance_uid
        if affected and affected != sop_uid:
            raise RejectedInstance(
                CANNOT_UNDERSTAND,
                f"Affected SOP Instance UID {affected} differs from the data set's SOP Instance UID {sop_uid}",
            )
        identity = {
            "sop_instance_uid": sop_uid,
            "study_uid": study_uid,
            "series_instance_uid": series_instance_uid,
            "sop_class_uid": context_sop_class,
            "transfer_syntax_uid": transfer_syntax,
            "patient_id": patient_id,
            "accession_number": accession,
        }
        return identity, manufacturer

    def _quarantine(self, arrival: Arrival, rejected: RejectedInstance) -> Answer:
        """Keep a rejected instance with its reason, within bounds: under the free-space guard, in a
        folder of at most ``quarantine_max_mb`` (the oldest removed first, each removal audited),
        and at most ``max_rejected_per_association`` from one association (or STOW-RS request),
        which is ended at the next."""
        calling_ae = arrival.calling_ae
        rejected_here = self._rejected.get(arrival.batch, 0) + 1
        self._rejected[arrival.batch] = rejected_here
        if rejected_here > self.settings.max_rejected_per_association:
            why = (
                f"more than {self.settings.max_rejected_per_association} rejected instances in one "
                f"{'association' if arrival.via == 'dimse' else 'request'} (PLEURA_MAX_REJECTED_PER_ASSOCIATION)"
            )
            log.error("ending the %s from %s: %s", "association" if arrival.via == "dimse" else "request", calling_ae, why)
            self._audit_instance(arrival, "instance-refused", None, rejected.status, f"{rejected.reason} (not kept: {why})")
            self.audit.record(
                "association-aborted" if arrival.via == "dimse" else "request-ended",
                calling_ae=calling_ae.strip(), address=arrival.address, reason=why,
            )
            if arrival.abort is not None:
                arrival.abort()
            return Answer(rejected.status, rejected.reason)
        full = self.admission.disk_refusal()
        if full is not None:
            log.error("cannot quarantine a rejected instance from %s: %s", calling_ae, full)
            self._audit_instance(arrival, "instance-refused", None, OUT_OF_RESOURCES, f"cannot quarantine: {full}")
            return Answer(OUT_OF_RESOURCES, "disk nearly full; try again later")
        reason = "\n".join(
            (
                rejected.reason,
                f"status: 0x{rejected.status:04X}",
                f"{'calling AE' if arrival.via == 'dimse' else 'sent by STOW-RS, API user'}: {calling_ae}",
                f"affected SOP class: {arrival.sop_class_uid}",
                f"affected SOP instance: {arrival.affected_sop_instance_uid}",
                f"transfer syntax: {arrival.transfer_syntax_uid}",
            )
        )
        try:
            path = self.store.quarantine(arrival.data, reason)
            removed = self.store.trim_quarantine(self.settings.quarantine_max_mb * 1_000_000)
        except OSError as exc:
            # Not kept here, so the sender must keep it: answer a status it retries on.
            log.error("cannot quarantine a rejected instance from %s: %s", calling_ae, exc)
            self._audit_instance(arrival, "instance-refused", None, OUT_OF_RESOURCES, "cannot quarantine")
            return Answer(OUT_OF_RESOURCES, "cannot keep the rejected data set; try again")
        # The reason may quote UIDs: the log names the quarantine file, which holds it.
        log.warning("rejected an instance from %s with status 0x%04X; kept in %s", calling_ae, rejected.status, path)
        self._audit_instance(arrival, "instance-refused", None, rejected.status, f"{rejected.reason} (kept in {path.name})")
        for old in removed:
            log.warning("removed %s from the quarantine (PLEURA_QUARANTINE_MAX_MB is %d)", old.name,
                        self.settings.quarantine_max_mb)
            self.audit.record("quarantine-removed", file=old.name,
                              reason=f"quarantine over PLEURA_QUARANTINE_MAX_MB ({self.settings.quarantine_max_mb})")
        return Answer(rejected.status, rejected.reason)
