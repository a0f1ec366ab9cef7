"""What every result writer shares: identity of the maker, the source's context, descriptions.

Each builder (SEG, SR, GSPS, SC) takes the source image's header from :func:`source_header`, names
the model the same way (:func:`describe`, :func:`algorithm_identification`) and finishes its object
with :func:`carry_context`, so patient, study, character set and issuer attributes match the
source's in every object Pleura writes.
"""

from __future__ import annotations

import re
from typing import Any

import pydicom
from highdicom import AlgorithmIdentificationSequence
from pydicom.sr.codedict import codes
from pydicom.valuerep import PersonName

from contract.bundle import ModelIdentity
from worker.inference.predict import positive_pair
from worker.inference.result import ImageFinding
from contract.marks import MANUFACTURER, SERIES_NUMBERS
from worker.writers.uids import device_uid, dimension_organization_uid, instance_uid, replace_uid, series_uid

DEMO_LABEL = "SYNTHETIC DEMO MODEL - not for clinical use"
"""Said by every object made with a model trained on synthetic data only."""
AI_DISCLAIMER = "AI result - not a diagnosis"
"""Shown with every result a viewer renders over or beside the image (GSPS text, SC banner)."""

PNEUMOTHORAX = codes.SCT.Pneumothorax  # SCT 36118008
FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003 (CID 7150)
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence  # DCM 123110

SUPPORTED_SOURCE_CLASSES = frozenset(
    {
        pydicom.uid.ComputedRadiographyImageStorage,
        pydicom.uid.DigitalXRayImageStorageForPresentation,
        pydicom.uid.DigitalXRayImageStorageForProcessing,
    }
)

_LONG_STRING_MAX = 64  # LO
_SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing")
# Patient and study attributes highdicom reads from the source without a default; Type 2, but
# some modalities leave them out altogether.
_TYPE2_HEADER_DEFAULTS = {
    "PatientName": PersonName(""),
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyID": "",
    "StudyDate": "",
    "StudyTime": "",
    "AccessionNumber": "",
    "ReferringPhysicianName": PersonName(""),
}
# Patient and study attributes the highdicom constructors do not copy, carried over when the
# source has them: the PACS matches patients and orders by the issuers, and shows the rest.
_CARRIED_CONTEXT = (
    "SpecificCharacterSet",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "InstitutionName",
)


def source_header(source: pydicom.Dataset, *, keep_spacing: bool = True) -> pydicom.Dataset:
    """The source's attributes without its pixel data, as the result builders need them.

    Shares the element values with ``source`` (it is not a deep copy) but changes none of them.
    Unusable (zero or malformed) spacing attributes are always left out, usable ones too unless
    ``keep_spacing``; missing Type 2 patient/study attributes are added empty.
    """
    header = pydicom.Dataset()
    for tag in source.keys():
        if tag.group == 0x7FE0:  # before reading it: a deferred pixel data value stays on disk
            continue
        element = source[tag]
        if element.keyword in _SPACING_KEYWORDS:
            continue
        header.add(element)
    if keep_spacing:
        for keyword in _SPACING_KEYWORDS:
            if positive_pair(source.get(keyword)) is not None:
                header.add(source[keyword])
    for keyword, empty in _TYPE2_HEADER_DEFAULTS.items():
        if keyword not in header:
            setattr(header, keyword, empty)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    return header


def carry_context(result: pydicom.Dataset, source: pydicom.Dataset) -> pydicom.Dataset:
    """Copy the patient/study attributes of :data:`_CARRIED_CONTEXT` that ``source`` has and
    ``result`` lacks (the character set always), so the result files in the source's study and
    its text decodes as the source's does; then make the result reproducible
    (:func:`reproducible`)."""
    for keyword in _CARRIED_CONTEXT:
        if keyword in source and (keyword == "SpecificCharacterSet" or keyword not in result):
            value = source[keyword].value
            if value not in (None, "", []):
                setattr(result, keyword, value)
    return reproducible(result, source)


# Creation dates and times highdicom sets to "now", and the time that goes with each date.
_CREATION_DATES = {
    "InstanceCreationDate": "InstanceCreationTime",
    "ContentDate": "ContentTime",
    "PresentationCreationDate": "PresentationCreationTime",
    "DateOfSecondaryCapture": "TimeOfSecondaryCapture",
}
_SOURCE_DATES = (
    ("ContentDate", "ContentTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("SeriesDate", "SeriesTime"),
    ("StudyDate", "StudyTime"),
)
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
UNDATED = ("19700101", "000000")
"""The date and time of the results of a source that carries no valid date at all."""


def source_made_at(source: pydicom.Dataset) -> tuple[str, str]:
    """(DA, TM) of the source's content: its Content, else Acquisition, else Series, else Study
    date and time (the first valid date; midnight when its time is missing), else :data:`UNDATED`."""
    for date_keyword, time_keyword in _SOURCE_DATES:
        date = str(source.get(date_keyword) or "").strip()
        if _DA.match(date):
            time = str(source.get(time_keyword) or "").strip()
            return date, time if _TM.match(time) else "000000"
    return UNDATED


def reproducible(result: pydicom.Dataset, source: pydicom.Dataset) -> pydicom.Dataset:
    """Make ``result`` a pure function of what it was made from, so that analysing the same images
    with the same model again writes the same bytes under the same UIDs.

    - Dates and times: highdicom dates an object by the clock (creation, content, presentation,
      secondary capture, contributing equipment); they become the source's own date and time
      (:func:`source_made_at`), the date of the content the result describes.
    - UIDs: the Dimension Organization UID highdicom draws at random is derived from the result's
      SOP Instance UID (:func:`~worker.writers.uids.dimension_organization_uid`).
    """
    date, time = source_made_at(source)
    _redate(result, date, time)
    for item in result.get("DimensionOrganizationSequence") or []:
        drawn = str(item.DimensionOrganizationUID)
        replace_uid(result, drawn, dimension_organization_uid(str(result.SOPInstanceUID)))
    return result


def _redate(dataset: pydicom.Dataset, date: str, time: str) -> None:
    for date_keyword, time_keyword in _CREATION_DATES.items():
        if date_keyword in dataset:
            setattr(dataset, date_keyword, date)
            setattr(dataset, time_keyword, time)
    if "ContributionDateTime" in dataset:
        dataset.ContributionDateTime = date + time
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                _redate(item, date, time)


def describe(kind: str, model: ModelIdentity) -> str:
    """A Series/Content Description (LO, at most 64 characters) naming the model.

    With a synthetic demo model the description starts with :data:`DEMO_LABEL`; the version and
    then the model name give way when the whole would not fit.
    """
    head = DEMO_LABEL if model.synthetic_demo else MANUFACTURER
    candidates = (
        f"{head} {kind} {model.name} {model.version}",
        f"{head} {kind} {model.name}",
        f"{head} {kind}",
    )
    for text in candidates:
        if len(text) <= _LONG_STRING_MAX:
            return text
    return candidates[-1][:_LONG_STRING_MAX]


def algorithm_identification(model: ModelIdentity) -> AlgorithmIdentificationSequence:
    """The Algorithm Identification Sequence (model name, version, AI family, source); a composed
    bundle's networks as its Algorithm Parameters (role -> "NAME VERSION")."""
    parameters = dict(component.split(" ", 1) for component in model.components)
    return AlgorithmIdentificationSequence(
        name=model.name,
        family=ALGORITHM_FAMILY,
        version=model.version,
        source=model.manufacturer,
        parameters=parameters or None,
    )


def tracking_uid(source: pydicom.Dataset, model: ModelIdentity) -> str:
    """The UID that ties the SEG's segment, the SR's measurement group and the GSPS's outline
    for one image."""
    return instance_uid(source.SOPInstanceUID, model, "TRACKING")


def image_result_identity(source: pydicom.Dataset, model: ModelIdentity, kind: str) -> dict[str, Any]:
    """The arguments every highdicom constructor of a per-image result takes alike: its series and
    instance UIDs (deterministic, see :mod:`worker.writers.uids`), numbers, and the equipment."""
    return {
        "series_instance_uid": series_uid(source.StudyInstanceUID, model, kind),
        "series_number": SERIES_NUMBERS[kind],
        "sop_instance_uid": instance_uid(source.SOPInstanceUID, model, kind),
        "instance_number": instance_number(source),
        **equipment(model),
    }


def equipment(model: ModelIdentity) -> dict[str, Any]:
    """The equipment every result names (General Equipment module): Pleura, the model's name and
    version, and the device UID as serial number."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": model.name,
        "software_versions": model.version,
        "device_serial_number": device_uid(model),
    }


def instance_number(source: pydicom.Dataset) -> int:
    """The source's Instance Number (so results sort like their images), else 1."""
    try:
        number = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if number >= 1 else 1


def check_source(source: pydicom.Dataset) -> None:
    """Raise ValueError unless ``source`` is a single-frame CR or DX image."""
    if source.SOPClassUID not in SUPPORTED_SOURCE_CLASSES:
        raise ValueError(
            f"cannot write results for SOP class {source.SOPClassUID} ({source.SOPClassUID.name}): "
            "only CR and DX images are supported"
        )
    if int(source.get("NumberOfFrames") or 1) != 1:
        raise ValueError("only single-frame source images are supported")


def decision_text(finding: ImageFinding) -> str:
    """"Pneumothorax suspected (left)" or "No pneumothorax suspected": the decision for a viewer."""
    if not finding.flagged:
        return "No pneumothorax suspected"
    side = f" ({finding.side}{', assumed' if finding.side_assumed else ''})" if finding.side else ""
    return f"Pneumothorax suspected{side}"


def finding_text(finding: ImageFinding, model: ModelIdentity) -> str:
    """One line for a viewer: the decision, side, probability and model, and the disclaimer."""
    text = f"{decision_text(finding)}, p={finding.probability:.2f} - {model.name} {model.version} - {AI_DISCLAIMER}"
    return f"{text} - {DEMO_LABEL}" if model.synthetic_demo else text

