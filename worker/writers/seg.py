"""The DICOM Segmentation (SEG) result: the pneumothorax mask of one projection radiograph.

One binary segment, "Pneumothorax", in the source image's own pixel grid. The SEG is written for
every analysed image, with an empty frame when nothing was found, so that a PACS shows that the
image was analysed and the SR always has a segment to reference.

Geometry. Projection radiographs (CR, DX) have no Frame of Reference and no Image
Position/Orientation; highdicom then builds a SEG without a patient coordinate system whose single
frame is aligned pixel for pixel with the source (Derivation Image Sequence with Spatial Locations
Preserved YES, no Plane Position/Orientation), so the SEG takes its geometry, spacing included,
from the source image. Its Pixel Measures functional group is left out on purpose, whatever
spacing the source has:

- without a Frame of Reference the Segmentation IOD does not require Pixel Measures;
- a Pixel Measures item needs a Slice Thickness to be read back by highdicom (``segread`` rejects
  it otherwise), and a projection radiograph has no slice thickness to give;
- Imager Pixel Spacing is measured at the detector, while Pixel Measures' Pixel Spacing means the
  patient plane: copying one into the other would mislabel it.

The SR reports the area in cm2 that the inference step computed from the source's spacing.
Zero spacing, which some CR readers write for "unknown", is never copied into a result.
"""

from __future__ import annotations

import numpy as np
import pydicom
from highdicom import AlgorithmIdentificationSequence
from highdicom.color import CIELabColor
from highdicom.seg import (
    Segmentation,
    SegmentAlgorithmTypeValues,
    SegmentationTypeValues,
    SegmentDescription,
)
from pydicom.sr.codedict import codes
from pydicom.valuerep import PersonName

from training.bundle import ModelIdentity
from worker.inference.predict import positive_pair
from worker.inference.result import ImageFinding
from worker.writers.uids import device_uid, instance_uid, series_uid

MANUFACTURER = "Pleura"
"""Manufacturer (0008,0070) of every object Pleura writes."""
DEMO_LABEL = "SYNTHETIC DEMO MODEL - not for clinical use"
"""Said by every object made with a model trained on synthetic data only."""

SEG_SERIES_NUMBER = 9901
SEGMENT_NUMBER = 1
SEGMENT_LABEL = "Pneumothorax"
PNEUMOTHORAX = codes.SCT.Pneumothorax  # SCT 36118008
FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003 (CID 7150)
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence  # DCM 123110
SEGMENT_COLOR = CIELabColor(53.24, 80.09, 67.20)  # red

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


def source_header(source: pydicom.Dataset, *, keep_spacing: bool = True) -> pydicom.Dataset:
    """The source's attributes without its pixel data, as the result builders need them.

    Shares the element values with ``source`` (it is not a deep copy) but changes none of them.
    Unusable (zero or malformed) spacing attributes are always left out, usable ones too unless
    ``keep_spacing``; missing Type 2 patient/study attributes are added empty.
    """
    header = pydicom.Dataset()
    for element in source:
        if element.tag.group == 0x7FE0 or element.keyword in _SPACING_KEYWORDS:
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
    """The Algorithm Identification Sequence (model name, version, AI family, source)."""
    return AlgorithmIdentificationSequence(
        name=model.name,
        family=ALGORITHM_FAMILY,
        version=model.version,
        source=model.manufacturer,
    )


def tracking_uid(source: pydicom.Dataset, model: ModelIdentity) -> str:
    """The UID that ties the SEG's segment to the SR's measurement group for one image."""
    return instance_uid(source.SOPInstanceUID, model, "TRACKING")


def build_seg(source: pydicom.Dataset, finding: ImageFinding, model: ModelIdentity) -> Segmentation:
    """A binary SEG of ``finding.mask`` on the single-frame CR/DX image ``source``.

    Raises ValueError when the source is not a single-frame CR or DX image or the mask does not
    match its Rows x Columns.
    """
    if source.SOPClassUID not in SUPPORTED_SOURCE_CLASSES:
        raise ValueError(
            f"cannot segment SOP class {source.SOPClassUID} ({source.SOPClassUID.name}): "
            "only CR and DX images are supported"
        )
    if int(source.get("NumberOfFrames") or 1) != 1:
        raise ValueError("only single-frame source images are supported")
    mask = np.asarray(finding.mask)
    if mask.shape != (source.Rows, source.Columns):
        raise ValueError(
            f"mask shape {mask.shape} does not match the source image ({source.Rows}, {source.Columns})"
        )

    # Without spacing in its input highdicom writes no Pixel Measures (see the module docstring).
    header = source_header(source, keep_spacing=False)
    segment = SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=FINDING_CATEGORY,
        segmented_property_type=PNEUMOTHORAX,
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
        tracking_uid=tracking_uid(source, model),
        tracking_id=SEGMENT_LABEL,
        display_color=SEGMENT_COLOR,
    )
    seg = Segmentation(
        source_images=[header],
        pixel_array=mask.astype(bool),
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_uid(source.StudyInstanceUID, model, "SEG"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=instance_uid(source.SOPInstanceUID, model, "SEG"),
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=device_uid(model),
        content_label="PNEUMOTHORAX",
        content_description=describe("pneumothorax SEG", model),
        series_description=describe("SEG", model),
        omit_empty_frames=False,
    )
    # Without a Frame of Reference the General Image module requires Patient Orientation (Type
    # 2C), which highdicom does not write; the frame is pixel-aligned with the source, so the
    # source's orientation is the SEG's.
    seg.PatientOrientation = source.get("PatientOrientation") or ""
    return seg


def _instance_number(source: pydicom.Dataset) -> int:
    """The source's Instance Number (so results sort like their images), else 1."""
    try:
        number = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if number >= 1 else 1
