"""Patient and study context from the DICOM header of a study's first image, for the worklist
(name, age, sex, study date and time, description, modality, view), cached per study: a header,
once stored, does not change."""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pydicom
from pydicom.valuerep import DA, TM

from node.storage import InstanceStore

CACHE_SIZE = 5000
CONTEXT_TAGS = (
    "PatientName", "PatientAge", "PatientSex", "PatientBirthDate", "StudyDate", "StudyTime",
    "StudyDescription", "Modality", "ViewPosition", "TimezoneOffsetFromUTC",
)  # fmt: skip


def _text(value: Any) -> str | None:
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def _age(header: pydicom.Dataset, study_day: date | None) -> str | None:
    """The header's Patient's Age (052Y → "52 y"), else years from the birth date to the study."""
    given = _text(header.get("PatientAge"))
    if given and given[:-1].isdigit():
        unit = {"Y": "y", "M": "mo", "W": "w", "D": "d"}.get(given[-1].upper(), "")
        return f"{int(given[:-1])} {unit}".strip()
    born = _text(header.get("PatientBirthDate"))
    if born and study_day:
        try:
            birth = DA(born)
        except ValueError:
            return None
        if birth is not None:
            years = study_day.year - birth.year - ((study_day.month, study_day.day) < (birth.month, birth.day))
            return f"{years} y"
    return None


def _study_datetime(header: pydicom.Dataset, zone: ZoneInfo) -> datetime | None:
    """Study Date + Time; DICOM times are the site's local time unless Timezone Offset From UTC says."""
    try:
        day = DA(_text(header.get("StudyDate"))) if _text(header.get("StudyDate")) else None
        clock = TM(_text(header.get("StudyTime"))) if _text(header.get("StudyTime")) else None
    except ValueError:
        return None
    if day is None:
        return None
    moment = datetime.combine(day, clock.replace(microsecond=0) if clock else datetime.min.time())
    offset = _text(header.get("TimezoneOffsetFromUTC"))
    if offset and len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        from datetime import timedelta, timezone

        sign = 1 if offset[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:])))
        return moment.replace(tzinfo=tz)
    return moment.replace(tzinfo=zone)


class StudyContext:
    """Reads and caches the context of studies (keyed by Study Instance UID)."""

    def __init__(self, store: InstanceStore, time_zone: str) -> None:
        self.store = store
        self.zone = ZoneInfo(time_zone)
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def known(self, study_uid: str) -> bool:
        with self._lock:
            return study_uid in self._cache

    def of(self, study_uid: str, storage_key: str | None) -> dict[str, Any]:
        """The context fields of :class:`node.api.schemas.StudySummary` (all None when unreadable)."""
        with self._lock:
            if study_uid in self._cache:
                self._cache.move_to_end(study_uid)
                return self._cache[study_uid]
        context = self._read(storage_key)
        if storage_key is not None:
            with self._lock:
                self._cache[study_uid] = context
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return context

    def _read(self, storage_key: str | None) -> dict[str, Any]:
        empty: dict[str, Any] = dict.fromkeys(
            ("patient_name", "patient_age", "patient_sex", "study_datetime", "study_description", "modality", "view")
        )
        if storage_key is None:
            return empty
        try:
            header = pydicom.dcmread(self.store.path(storage_key), stop_before_pixels=True, specific_tags=list(CONTEXT_TAGS))
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            return empty
        when = _study_datetime(header, self.zone)
        name = header.get("PatientName")
        return {
            "patient_name": str(name).replace("^", " ").strip() or None if name is not None else None,
            "patient_age": _age(header, when.date() if when else None),
            "patient_sex": _text(header.get("PatientSex")),
            "study_datetime": when,
            "study_description": _text(header.get("StudyDescription")),
            "modality": _text(header.get("Modality")),
            "view": _text(header.get("ViewPosition")),
        }
