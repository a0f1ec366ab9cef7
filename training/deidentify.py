"""De-identified copies of received images, for a training set that leaves the hospital.

The rules are DICOM PS3.15 Annex E's Basic Application Level Confidentiality Profile, applied to
*every* attribute of its Table E.1-1. The table itself (several hundred attributes, revised with each
edition of the standard) comes from the ``dicom-anonymizer`` package (Kitware's, which tracks the
standard's editions; we use its 2026c table): keeping that list by hand is how identifiers leak. Its
own action functions are not used: they act on the top level only (an identifier inside a sequence
stays), replace UIDs with random ones (a second export would not match the first) and write dummy
dates where the table says remove. So the table drives the walk below, through every sequence:

- X (remove) and the X/Z, X/D, X/Z/D choices: removed — no radiograph IOD this node receives
  needs these present (but Acquisition Context Sequence, Type 2 in DX: emptied), and a missing
  Type 3 beats a dummy; X/Z/U* (image references): kept, with their UIDs replaced;
- Z (empty): emptied (a date gets the dummy date, which stays valid where a module wants it);
- D and Z/D (replace): a dummy of the right VR;
- U and every other UID that is not DICOM-defined (``1.2.840.10008.*``: SOP classes, transfer
  syntaxes...) or a class: a keyed ``2.25.`` UID (HMAC of the original), in the file meta too, so
  references between objects and across a study stay consistent and a second export matches;
- private attributes, overlays and curves (which can hold burned-in text) are removed, and so is
  any other person name; the file meta is rebuilt (no source application entity title).

Options (recorded in De-identification Method Code Sequence, after DCM 113100):

- Retain Patient Characteristics (113108): sex, age, size and weight are kept.
- Dates: ``remove`` (the basic profile: every date and time becomes 1900-01-01 00:00 or goes), or
  ``shift`` — Retain Longitudinal Temporal Information with Modified Dates (113107): every date
  moves back by a keyed number of days per patient, so intervals within a patient's studies hold;
  times of day are kept.

Patient ID becomes a keyed pseudonym (HMAC-SHA-256 with a secret key): the same patient always gets
the same pseudonym, so patient-level splits still hold, and it cannot be reversed without the key.
Patient Name becomes the same pseudonym (Pleura's SYNTHETIC^DEMO marker is kept: a model trained on
generated images must still say so). An image whose Burned In Annotation is YES cannot be cleaned
this way and is refused.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import secrets
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _table
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset

from config.errors import PleuraError
from training.synthetic import SYNTHETIC_PATIENT_NAME

KEY_FILE = "deidentify.key"
"""The secret key, in the storage directory unless another is given (keep it to get the same
pseudonyms in every export; whoever holds it can re-identify patients they already know)."""

DateOption = Literal["remove", "shift"]
DATE_OPTIONS: tuple[str, ...] = ("remove", "shift")

DICOM_UID_ROOT = "1.2.840.10008."
DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
PSEUDONYM_PREFIX = "ANON-"
METHOD = ("PS3.15 E.1-1 (2026c) Basic Profile", "Retain Patient Characteristics")
"""De-identification Method's values (an LO holds 64 characters, so one per part)."""
MAX_SHIFT_DAYS = 3650
"""Dates move back by 1 to this many days (keyed per patient) with the ``shift`` option."""

TYPE_2 = frozenset({0x00400555})
"""Attributes whose action is "X unless Z is required" that a radiograph IOD requires (Acquisition
Context Sequence is Type 2 in DX): emptied instead of removed."""

RETAINED = frozenset({0x00100040, 0x00101010, 0x00101020, 0x00101030})
"""Patient's Sex, Age, Size, Weight: kept by the Retain Patient Characteristics option."""


def _actions() -> tuple[dict[int, str], list[tuple[int, int, int, int]]]:
    """Table E.1-1 as {tag: action}, and its repeating groups (curves, overlays: all removed)."""
    categories = {
        "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
        "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
    }  # fmt: skip
    actions: dict[int, str] = {}
    ranges: list[tuple[int, int, int, int]] = []
    for name, action in categories.items():
        for entry in getattr(_table, name):
            if len(entry) == 4:
                ranges.append(entry)
            else:
                actions[(entry[0] << 16) | entry[1]] = action
    return actions, ranges


PROFILE, _REPEATING = _actions()
"""Every attribute of the profile's table and its action (X, Z, D, U and the combined choices)."""

_KEEP_UIDS = frozenset({
    "SOPClassUID", "ReferencedSOPClassUID", "TransferSyntaxUID", "MediaStorageSOPClassUID", "CodingSchemeUID",
    "ContextUID", "MappingResourceUID", "ImplementationClassUID",
})  # fmt: skip
"""UIDs that name a kind of thing (class, syntax, coding scheme), not a patient's object: kept."""

_DUMMY_TEXT = {"AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DS": "0", "IS": "0", "UR": ""}
_NUMERIC = frozenset({"FD", "FL", "SL", "SS", "UL", "US", "SV", "UV"})


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
    """De-identifies datasets with one key: the same input always gives the same pseudonyms, UIDs and
    date shift. ``dates`` is ``remove`` (the basic profile) or ``shift`` (Modified Dates option)."""

    def __init__(self, key: bytes, *, dates: DateOption = "remove") -> None:
        if dates not in DATE_OPTIONS:
            raise DeidentificationError(f"dates must be one of {', '.join(DATE_OPTIONS)}, not {dates!r}")
        self._key = key
        self.dates = dates
        self._namespace = uuid.UUID(bytes=hmac.new(key, b"pleura-uid-namespace", hashlib.sha256).digest()[:16])

    @property
    def method(self) -> list[str]:
        """De-identification Method: the profile, the table's edition and the options."""
        return [*METHOD, *(["Modified Dates"] if self.dates == "shift" else [])]

    def pseudonym(self, patient_id: str) -> str:
        """The keyed pseudonym of a patient identifier (at most 64 characters, a valid LO)."""
        digest = hmac.new(self._key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return PSEUDONYM_PREFIX + digest[:24].upper()

    def uid(self, original: str) -> str:
        """The keyed replacement of a UID: ``2.25.`` and a name-based UUID in the key's namespace."""
        return f"2.25.{uuid.uuid5(self._namespace, original).int}"

    def shift_days(self, patient_id: str) -> int:
        """How many days this patient's dates move back (1 to :data:`MAX_SHIFT_DAYS`, keyed)."""
        digest = hmac.new(self._key, b"date-shift:" + patient_id.encode("utf-8"), hashlib.sha256).digest()
        return 1 + int.from_bytes(digest[:8], "big") % MAX_SHIFT_DAYS

    def _date(self, element: DataElement, days: int) -> None:
        values = element.value if element.VM > 1 else [element.value]
        shifted = []
        for value in values:
            text = str(value)
            try:
                moved = date(int(text[:4]), int(text[4:6]), int(text[6:8])) - timedelta(days=days)
                shifted.append(f"{moved.year:04d}{moved.month:02d}{moved.day:02d}" + (text[8:] if element.VR == "DT" else ""))
            except (ValueError, OverflowError):
                shifted.append(DUMMY[element.VR])
        element.value = shifted if element.VM > 1 else shifted[0]

    def _element(self, dataset: Dataset, element: DataElement, days: int | None) -> None:
        tag, vr = element.tag, element.VR
        if tag in RETAINED:
            return
        action = PROFILE.get(int(tag))
        if tag.is_private or any(tag.group & gm == g & gm and tag.element & em == e & em for g, e, gm, em in _REPEATING):
            del dataset[tag]
        elif vr == "UI" and (action == "U" or element.keyword not in _KEEP_UIDS and not element.keyword.endswith("ClassUID")):
            if element.value:  # U, and every other instance UID (the profile replaces them all)
                values = element.value if element.VM > 1 else [element.value]
                mapped = [str(v) if str(v).startswith(DICOM_UID_ROOT) else self.uid(str(v)) for v in values]
                element.value = mapped if element.VM > 1 else mapped[0]
        elif vr in ("DA", "DT") and days is not None and element.value:
            self._date(element, days)  # Modified Dates: every date moves, none is removed
        elif action == "X/Z/U*":
            pass  # image references: kept, their UIDs replaced by the same walk (references still resolve)
        elif action is not None and action.startswith("X") and tag in TYPE_2:
            element.value = [] if vr == "SQ" else None
        elif action is not None and action.startswith("X"):
            del dataset[tag]
        elif action in ("D", "Z/D", "Z") and vr in DUMMY:
            # a dummy date stays valid where a module needs one (Content Date is Type 1 in DX)
            element.value = DUMMY[vr] if element.value or action != "Z" else None
        elif action in ("Z", "Z/D"):
            element.value = [] if vr == "SQ" else None
        elif action == "D":
            element.value = self._dummy(vr, element)
        elif vr == "PN":
            element.value = None
        elif vr in DUMMY and element.value and not (vr == "TM" and days is not None):
            element.value = DUMMY[vr]

    @staticmethod
    def _dummy(vr: str, element: DataElement) -> object:
        if vr == "SQ":
            return element.value  # its items are cleaned by the same walk
        if vr in _NUMERIC:
            return 0
        if vr in ("OB", "OW", "UN"):
            return b""
        return _DUMMY_TEXT.get(vr, "ANONYMIZED")

    def apply(self, source: Dataset) -> Dataset:
        """A de-identified copy of ``source`` (file meta rebuilt)."""
        if str(source.get("BurnedInAnnotation", "")).strip().upper() == "YES":
            raise DeidentificationError("Burned In Annotation is YES: text in the pixel data would stay")
        ds = copy.deepcopy(source)
        if hasattr(ds, "file_meta"):
            del ds.file_meta
        synthetic = str(ds.get("PatientName", "")) == SYNTHETIC_PATIENT_NAME
        patient = str(ds.get("PatientID", "") or "").strip() or str(ds.StudyInstanceUID)
        days = self.shift_days(patient) if self.dates == "shift" else None
        ds.remove_private_tags()
        ds.walk(lambda dataset, element: self._element(dataset, element, days))
        ds.PatientID = self.pseudonym(patient)
        ds.PatientName = SYNTHETIC_PATIENT_NAME if synthetic else ds.PatientID
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if days is not None else "REMOVED"
        ds.DeidentificationMethod = self.method
        ds.DeidentificationMethodCodeSequence = [
            _code("113100", "Basic Application Confidentiality Profile"),
            _code("113108", "Retain Patient Characteristics Option"),
        ] + ([_code("113107", "Retain Longitudinal Temporal Information Modified Dates Option")] if days else [])
        meta = getattr(source, "file_meta", None)
        if meta is not None:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = meta.TransferSyntaxUID
        return ds


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item
