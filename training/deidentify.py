"""De-identified copies of received images, for a training set that leaves the hospital.

pydicom supplies the means (``Dataset.walk`` through every sequence, ``remove_private_tags``,
the data dictionary's VRs); it has no de-identification profile and neither has highdicom, so the
rules below are written here, after PS3.15 Annex E's Basic Application Level Confidentiality
Profile with the Retain Patient Characteristics option (sex, age, size and weight are kept):

- Patient ID becomes a keyed pseudonym (HMAC-SHA-256 with a secret key): the same patient always
  gets the same pseudonym, so patient-level splits still hold, and it cannot be reversed without
  the key. Patient Name becomes the same pseudonym (Pleura's SYNTHETIC^DEMO marker is kept: a
  model trained on generated images must still say so).
- Every UID that is not a DICOM-defined one (``1.2.840.10008.*``: SOP classes, transfer
  syntaxes...) is replaced by a keyed ``2.25.`` UID, in the file meta too, so references between
  objects and the SIIM ``ImageId`` (the new SOP Instance UID) stay consistent.
- Person names are emptied; dates and times are replaced by a dummy (1900-01-01 00:00), which
  keeps attributes a module requires present and valid; the identifying attributes listed in
  :data:`REMOVED` are removed, those in :data:`EMPTIED` emptied; private attributes and overlays
  (which can hold burned-in text) are removed.
- Patient Identity Removed is YES and the method is recorded (De-identification Method and its
  code sequence).

An image whose Burned In Annotation is YES cannot be cleaned this way and is refused.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import secrets
import uuid
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from config.errors import PleuraError
from training.synthetic import SYNTHETIC_PATIENT_NAME

KEY_FILE = "deidentify.key"
"""The secret key, in the storage directory unless another is given (keep it to get the same
pseudonyms in every export; whoever holds it can re-identify patients they already know)."""

DICOM_UID_ROOT = "1.2.840.10008."
DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
PSEUDONYM_PREFIX = "ANON-"
METHOD = "Pleura: PS3.15 Basic Profile, Retain Patient Characteristics"

EMPTIED = frozenset({"AccessionNumber", "StudyID", "PatientBirthDate", "IssuerOfPatientID", "ReferringPhysicianName"})
"""Type 2 identifiers: kept present (the IODs require them), emptied."""

REMOVED = frozenset({
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "PatientTelecomInformation", "MedicalRecordLocator",
    "MilitaryRank", "BranchOfService", "Occupation", "PatientReligiousPreference", "EthnicGroup",
    "AdditionalPatientHistory", "PatientComments", "PatientInsurancePlanCodeSequence", "RegionOfResidence",
    "CountryOfResidence", "PatientBirthTime", "PatientState", "MedicalAlerts", "Allergies",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "StationName", "DeviceSerialNumber", "DetectorID", "PlateID", "CassetteID", "GantryID",
    "StudyDescription", "SeriesDescription", "ImageComments", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "PerformedProcedureStepID", "RequestedProcedureID",
    "ScheduledProcedureStepID", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "RequestAttributesSequence", "ReferencedPatientSequence",
    "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence", "AdmissionID", "AdmittingDiagnosesDescription",
    "CurrentPatientLocation", "PatientInstitutionResidence", "VisitComments", "ProtocolName",
    "DerivationDescription", "AcquisitionComments", "ContentCreatorName", "OperatorIdentificationSequence",
    "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianIdentificationSequence",
    "ReferringPhysicianIdentificationSequence", "InstitutionalDepartmentTypeCodeSequence",
})  # fmt: skip
"""Type 3 identifiers (or ones no radiograph module requires): removed."""

_KEEP_UIDS = frozenset({
    "SOPClassUID", "ReferencedSOPClassUID", "TransferSyntaxUID", "MediaStorageSOPClassUID", "CodingSchemeUID",
    "ContextUID", "MappingResourceUID", "ImplementationClassUID",
})  # fmt: skip
"""UIDs that name a kind of thing (class, syntax, coding scheme), not a patient's object: kept."""


class DeidentificationError(PleuraError, ValueError):
    """An image that cannot be de-identified by these rules; the message says why."""


def load_key(path: Path) -> bytes:
    """The secret key in ``path``, made (random, owner-only) when it does not exist yet."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise DeidentificationError(f"{path}: not a de-identification key (hex); delete it to make a new one") from None
    if len(key) < 16:
        raise DeidentificationError(f"{path}: the key is too short ({len(key)} bytes, at least 16)")
    return key


class Deidentifier:
    """De-identifies datasets with one key: the same input always gives the same pseudonyms and UIDs."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._namespace = uuid.UUID(bytes=hmac.new(key, b"pleura-uid-namespace", hashlib.sha256).digest()[:16])

    def pseudonym(self, patient_id: str) -> str:
        """The keyed pseudonym of a patient identifier (at most 64 characters, a valid LO)."""
        digest = hmac.new(self._key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return PSEUDONYM_PREFIX + digest[:24].upper()

    def uid(self, original: str) -> str:
        """The keyed replacement of a UID: ``2.25.`` and a name-based UUID in the key's namespace."""
        return f"2.25.{uuid.uuid5(self._namespace, original).int}"

    def _element(self, dataset: Dataset, element: DataElement) -> None:
        keyword = element.keyword
        if element.tag.is_private or 0x6000 <= element.tag.group <= 0x60FF:
            del dataset[element.tag]
        elif keyword in REMOVED:
            del dataset[element.tag]
        elif keyword in EMPTIED:
            element.value = None
        elif element.VR == "UI" and keyword not in _KEEP_UIDS and element.value:
            values = element.value if element.VM > 1 else [element.value]
            mapped = [str(v) if str(v).startswith(DICOM_UID_ROOT) else self.uid(str(v)) for v in values]
            element.value = mapped if element.VM > 1 else mapped[0]
        elif element.VR == "PN" and keyword != "PatientName":
            element.value = None
        elif element.VR in DUMMY and element.value:
            element.value = DUMMY[element.VR]

    def apply(self, source: Dataset) -> Dataset:
        """A de-identified copy of ``source`` (file meta included)."""
        if str(source.get("BurnedInAnnotation", "")).strip().upper() == "YES":
            raise DeidentificationError("Burned In Annotation is YES: text in the pixel data would stay")
        ds = copy.deepcopy(source)
        synthetic = str(ds.get("PatientName", "")) == SYNTHETIC_PATIENT_NAME
        patient = str(ds.get("PatientID", "") or "").strip() or str(ds.StudyInstanceUID)
        ds.remove_private_tags()
        ds.walk(self._element)
        ds.PatientID = self.pseudonym(patient)
        ds.PatientName = SYNTHETIC_PATIENT_NAME if synthetic else ds.PatientID
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        ds.DeidentificationMethodCodeSequence = [
            _code("113100", "Basic Application Confidentiality Profile"),
            _code("113108", "Retain Patient Characteristics Option"),
        ]
        if getattr(source, "file_meta", None) is not None:
            ds.file_meta = copy.deepcopy(source.file_meta)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item

