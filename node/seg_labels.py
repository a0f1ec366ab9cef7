"""Segmentations sent back to Pleura: a radiologist's outline (or its absence) as a training label.

A PACS viewer can save a DICOM Segmentation (SEG) of an image Pleura analysed, and a forwarding
rule can send it to Pleura's AE title. Such a SEG is never analysed; the node stores it like any
instance and records, per image it references, whether it outlines a pneumothorax: a positive
with that mask, or, when the pneumothorax segment is empty, a negative (:meth:`Ledger.record_seg_labels`).
The feedback export and :func:`training.archive.read_archive` then treat it as a corrected outline
by the sending AE.

Which segments count: those whose Segmented Property Type is Pneumothorax (SCT 36118008) or whose
label says "pneumothorax". A SEG with no such segment is kept, but labels nothing. A SEG Pleura
wrote itself that comes back (a PACS forwarding everything, a viewer re-sending the study) is no
label: the ledger knows its SOP Instance UID as a result, or it carries Pleura's Manufacturer and
SEG series number with only AUTOMATIC segments.

highdicom reads the SEG (:meth:`highdicom.seg.Segmentation.from_dataset`): it resolves the
references (Referenced Series Sequence, per-frame Derivation Image Sequence) and the frames of
each source image, for binary, fractional and label-map SEGs alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from highdicom.seg import Segmentation
from pydicom.sr.codedict import codes
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SegmentationStorage,
)

from config.errors import PleuraError
from contract.marks import MANUFACTURER, SERIES_NUMBERS

SEGMENTATION_SOP_CLASS = str(SegmentationStorage)

SEG_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
)
"""The lossless transfer syntaxes a SEG comes in (a mask must not be changed by compression)."""

PNEUMOTHORAX = codes.SCT.Pneumothorax  # SCT 36118008
FRACTIONAL_THRESHOLD = 0.5
"""A fractional SEG's pixel is inside the outline from this probability / occupancy on."""


class SegLabelError(PleuraError, ValueError):
    """A Segmentation that cannot be read as a label; the message says which attribute is wrong."""


@dataclass(frozen=True)
class ImageLabel:
    """What a SEG says about one image it references."""

    study_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    positive: bool


@dataclass(frozen=True)
class SegLabels:
    """A received SEG read as labels: per referenced image, or none at all (``why_none``)."""

    labels: tuple[ImageLabel, ...]
    why_none: str | None = None


def open_segmentation(dataset: pydicom.Dataset) -> Segmentation:
    """The SEG as highdicom reads it; :class:`SegLabelError` when highdicom cannot."""
    if str(dataset.get("SOPClassUID", "")).strip() != SEGMENTATION_SOP_CLASS:
        raise SegLabelError(f"SOP Class UID (0008,0016) {dataset.get('SOPClassUID')} is not Segmentation Storage")
    if "PixelData" not in dataset:
        raise SegLabelError("no Pixel Data (7FE0,0010)")
    try:
        return Segmentation.from_dataset(dataset, copy=False)
    except Exception as exc:  # highdicom raises AttributeError, ValueError, KeyError... on a bad SEG
        raise SegLabelError(f"not a valid Segmentation: {exc}") from None


def pneumothorax_segments(seg: Segmentation) -> list[int]:
    """The numbers of the segments that outline a pneumothorax."""
    numbers = []
    for item in seg.SegmentSequence:
        property_types = item.get("SegmentedPropertyTypeCodeSequence") or []
        coded = any(
            str(code.get("CodeValue", "")) == PNEUMOTHORAX.value
            and str(code.get("CodingSchemeDesignator", "")) in ("SCT", "SRT")
            for code in property_types
        )
        if coded or "pneumothorax" in str(item.get("SegmentLabel", "")).lower():
            numbers.append(int(item.SegmentNumber))
    return numbers


def is_pleura_seg(dataset: pydicom.Dataset) -> bool:
    """Whether the SEG is one Pleura's worker wrote (its Manufacturer and series number, and only
    automatic segments), whatever SOP Instance UID it carries now."""
    automatic = all(
        str(item.get("SegmentAlgorithmType", "")).upper() == "AUTOMATIC" for item in dataset.get("SegmentSequence", [])
    )
    return (
        str(dataset.get("Manufacturer", "")).strip() == MANUFACTURER
        and str(dataset.get("SeriesNumber", "")).strip() == str(SERIES_NUMBERS["SEG"])
        and automatic
    )


def _masks(seg: Segmentation, sop_instance_uid: str, segments: list[int]) -> np.ndarray:
    """The union of ``segments`` on one source image: bool (Rows, Columns)."""
    pixels = seg.get_pixels_by_source_instance(
        [sop_instance_uid],
        segment_numbers=segments,
        ignore_spatial_locations=True,  # a viewer's SEG need not say Spatial Locations Preserved
        assert_missing_frames_are_empty=True,  # an empty outline may omit its frames
    )
    # (1, Rows, Columns, segments); fractional values are rescaled to 0..1, binary ones are 0/1.
    return (np.asarray(pixels[0]) >= FRACTIONAL_THRESHOLD).any(axis=-1)


def read_seg_labels(dataset: pydicom.Dataset) -> SegLabels:
    """What a received SEG says about each image it references (decodes its pixel data).

    Raises :class:`SegLabelError` for a SEG that is not valid or references no image.
    """
    seg = open_segmentation(dataset)
    sources = seg.get_source_image_uids()
    if not sources:
        raise SegLabelError(
            "references no image: Referenced Series Sequence (0008,1115) is missing or empty (it names "
            "the images outlined; each frame's Derivation Image Sequence (0008,9124) names its image)"
        )
    segments = pneumothorax_segments(seg)
    if not segments:
        return SegLabels((), "no segment is a pneumothorax (Segmented Property Type SCT 36118008 or its label)")
    labels = []
    for study_uid, series_instance_uid, sop_uid in sources:
        try:
            mask = _masks(seg, str(sop_uid), segments)
        except Exception as exc:  # undecodable frames, frames that contradict the header
            raise SegLabelError(f"the frames of image {sop_uid} cannot be read: {exc}") from None
        labels.append(ImageLabel(str(study_uid), str(series_instance_uid), str(sop_uid), bool(mask.any())))
    return SegLabels(tuple(labels))


def seg_mask(path: Path | str, sop_instance_uid: str, rows: int, columns: int) -> np.ndarray:
    """The pneumothorax outline a stored SEG (Pleura's or a radiologist's) draws on one image, bool
    (rows, columns); ValueError when it has none for that image or its size differs."""
    seg = open_segmentation(pydicom.dcmread(path))
    segments = pneumothorax_segments(seg)
    if not segments:
        raise ValueError(f"{path}: no pneumothorax segment")
    try:
        mask = _masks(seg, sop_instance_uid, segments)
    except Exception as exc:
        raise ValueError(f"{path}: no frames for image {sop_instance_uid}: {exc}") from None
    if mask.shape != (rows, columns):
        raise ValueError(f"{path}: the outline is {mask.shape[1]}x{mask.shape[0]}, the image {columns}x{rows}")
    return mask
