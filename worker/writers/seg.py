"""The DICOM Segmentation (SEG) result: the pneumothorax mask of one projection radiograph.

One binary segment, "Pneumothorax", in the source image's own pixel grid. The worker writes a SEG
for each image with a finding (flagged); the SR reports every analysed image, with or without one.

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

from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from highdicom.color import CIELabColor
from highdicom.seg import (
    Segmentation,
    SegmentAlgorithmTypeValues,
    SegmentationTypeValues,
    SegmentDescription,
)

from contract.bundle import ModelIdentity
from worker.inference.result import ImageFinding
from worker.writers.common import (
    FINDING_CATEGORY,
    PNEUMOTHORAX,
    algorithm_identification,
    carry_context,
    check_source,
    describe,
    image_result_identity,
    source_header,
    tracking_uid,
)

SEGMENT_NUMBER = 1
SEGMENT_LABEL = "Pneumothorax"
SEGMENT_COLOR = CIELabColor(53.24, 80.09, 67.20)  # red


def pneumothorax_segment(model: ModelIdentity, tracking: str) -> SegmentDescription:
    """The one segment of every SEG Pleura writes (radiograph or CT), tied to the SR by ``tracking``."""
    return SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=FINDING_CATEGORY,
        segmented_property_type=PNEUMOTHORAX,
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
        tracking_uid=tracking,
        tracking_id=SEGMENT_LABEL,
        display_color=SEGMENT_COLOR,
    )


def pneumothorax_seg(
    headers: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    model: ModelIdentity,
    tracking: str,
    identity: dict[str, Any],
    *,
    what: str,
    omit_empty_frames: bool,
) -> Segmentation:
    """The binary SEG of ``mask`` on ``headers`` (one image, or a series' slices) with the one
    :func:`pneumothorax_segment`; ``identity``: its UIDs, numbers and equipment; ``what`` names its
    content in the Content Description."""
    return Segmentation(
        source_images=headers,
        pixel_array=mask,
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=[pneumothorax_segment(model, tracking)],
        **identity,
        content_label="PNEUMOTHORAX",
        content_description=describe(what, model),
        series_description=describe("SEG", model),
        omit_empty_frames=omit_empty_frames,
    )


def build_seg(source: pydicom.Dataset, finding: ImageFinding, model: ModelIdentity) -> Segmentation:
    """A binary SEG of ``finding.mask`` on the single-frame CR/DX image ``source``.

    Raises ValueError when the source is not a single-frame CR or DX image or the mask does not
    match its Rows x Columns.
    """
    check_source(source)
    mask = np.asarray(finding.mask)
    if mask.shape != (source.Rows, source.Columns):
        raise ValueError(
            f"mask shape {mask.shape} does not match the source image ({source.Rows}, {source.Columns})"
        )

    # Without spacing in its input highdicom writes no Pixel Measures (see the module docstring).
    header = source_header(source, keep_spacing=False)
    seg = pneumothorax_seg(
        [header], mask.astype(bool), model, tracking_uid(source, model), image_result_identity(source, model, "SEG"),
        what="pneumothorax SEG", omit_empty_frames=False,
    )
    # Without a Frame of Reference the General Image module requires Patient Orientation (Type
    # 2C), which highdicom does not write; the frame is pixel-aligned with the source, so the
    # source's orientation is the SEG's.
    seg.PatientOrientation = source.get("PatientOrientation") or ""
    return carry_context(seg, source)


