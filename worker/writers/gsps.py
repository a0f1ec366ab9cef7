"""The Grayscale Softcopy Presentation State (GSPS) result: the outline and a label over the image.

Many PACS viewers that cannot show a DICOM SEG apply a presentation state: selecting it shows the
source radiograph with Pleura's outline of the suspected pneumothorax (a closed polyline per
contour, in the image's own pixel coordinates) and a one-line text label (decision, side,
probability, model, "AI result - not a diagnosis"). An image without a finding gets the label
alone, so a reader sees it was analysed.

The display pipeline is the source's, the one the model's input went through: its VOI (window or
VOI LUT) is copied, and one is made from the stored values' range when the source has none; its
Presentation LUT Sequence is carried over, and otherwise a MONOCHROME1 source, or one whose
Presentation LUT Shape is INVERSE, gets the INVERSE presentation LUT shape (a presentation state's
shape replaces the image's own), so a viewer shows what the radiologist and the model see.
"""

from __future__ import annotations

import numpy as np
import pydicom
from highdicom import PresentationLUT, PresentationLUTTransformation
from highdicom.color import CIELabColor
from highdicom.enum import PresentationLUTShapeValues
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextObject,
)
from pydicom.pixels import apply_modality_lut
from skimage.measure import approximate_polygon, find_contours

from contract.bundle import ModelIdentity
from contract.preprocess import presentation_inverted, presentation_lut_entries
from worker.inference.measure import bounding_box
from worker.inference.result import GRADCAM_REGION_LABEL, ImageFinding
from worker.writers.common import (
    carry_context,
    check_source,
    describe,
    finding_text,
    image_result_identity,
    source_header,
    tracking_uid,
)

LAYER = "PLEURA_AI"
LAYER_COLOR = CIELabColor(53.24, 80.09, 67.20)  # red, as the SEG's segment
CONTENT_LABEL = "PLEURA_AI"
MIN_CONTOUR_POINTS = 4
"""Contours with fewer vertices (single stray pixels) are not drawn."""
SIMPLIFY_TOLERANCE_PX = 0.75
"""Polyline simplification tolerance in pixels (keeps outlines small without visible change)."""


def outline_polylines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed (column, row) polylines around each region of ``mask``, in DICOM PIXEL units (the
    top-left corner of the first pixel is 0,0, so a pixel's centre is at index + 0.5)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    # Traced on the mask's bounding box only (the contours are the same, found in a fraction of
    # the pixels), padded so that regions on its edge close.
    box = bounding_box(mask)
    padded = np.pad(mask[box], 1)
    offset = np.array([box[1].start, box[0].start], dtype=np.float64)
    polylines = []
    for contour in find_contours(padded.astype(np.float32), 0.5):
        contour = approximate_polygon(contour, tolerance=SIMPLIFY_TOLERANCE_PX)
        if len(contour) < MIN_CONTOUR_POINTS:
            continue
        # (row, col) in the padded box -> (col, row) in the image, at the pixel centre
        points = contour[:, ::-1] - 1.0 + 0.5 + offset
        points = np.clip(points, 0.0, [mask.shape[1], mask.shape[0]])
        if not np.array_equal(points[0], points[-1]):
            points = np.vstack([points, points[:1]])
        polylines.append(points.astype(np.float64))
    return polylines


def _voi_from_values(source: pydicom.Dataset) -> SoftcopyVOILUTTransformation:
    """A window over the 0.5-99.5 percentile of the stored values (after the modality LUT)."""
    values = apply_modality_lut(source.pixel_array, source)
    low, high = np.percentile(values, [0.5, 99.5])
    width = max(float(high - low), 1.0)
    return SoftcopyVOILUTTransformation(
        window_center=float(low + high) / 2.0,
        window_width=width,
        window_explanation="Pleura: stored value range",
    )


def presentation_lut(source: pydicom.Dataset) -> PresentationLUTTransformation:
    """The presentation state's Presentation LUT: the one the model's input went through
    (:func:`~contract.preprocess.decode_radiograph`), so the outline is drawn on the picture
    the model saw. The source's own Presentation LUT Sequence is carried over (as 16-bit entries);
    otherwise INVERSE for a MONOCHROME1 source or one with Presentation LUT Shape INVERSE, IDENTITY
    for the rest."""
    if source.get("PresentationLUTSequence"):
        entries = np.rint(presentation_lut_entries(source) * 65535.0).astype(np.uint16)
        return PresentationLUTTransformation(
            presentation_lut=PresentationLUT(0, entries, "Pleura: the source image's Presentation LUT")
        )
    inverse = presentation_inverted(source)
    return PresentationLUTTransformation(
        presentation_lut_shape=PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY
    )


def build_gsps(source: pydicom.Dataset, finding: ImageFinding, model: ModelIdentity) -> GrayscaleSoftcopyPresentationState:
    """The presentation state of ``finding`` on the single-frame CR/DX image ``source``."""
    check_source(source)
    mask = np.asarray(finding.mask)
    if mask.shape != (source.Rows, source.Columns):
        raise ValueError(
            f"mask shape {mask.shape} does not match the source image ({source.Rows}, {source.Columns})"
        )
    header = source_header(source)
    rows, columns = int(source.Rows), int(source.Columns)
    uid = tracking_uid(source, model)
    graphics = None
    if finding.flagged:
        graphics = [
            GraphicObject(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=points,
                units=AnnotationUnitsValues.PIXEL,
                tracking_id=GRADCAM_REGION_LABEL if finding.is_gradcam_region else "Pneumothorax",
                tracking_uid=uid,
            )
            for points in outline_polylines(mask)
        ]
    text = finding_text(finding, model)
    if finding.flagged and finding.is_gradcam_region:
        text = f"{text} - {GRADCAM_REGION_LABEL}"
    label = TextObject(
        text_value=text,
        units=AnnotationUnitsValues.PIXEL,
        bounding_box=(0.02 * columns, 0.01 * rows, 0.98 * columns, 0.06 * rows),
    )
    layer = GraphicLayer(LAYER, order=1, description="Pleura AI result", display_color=LAYER_COLOR)
    annotation = GraphicAnnotation(
        referenced_images=[header],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=[label],
    )
    has_voi = "WindowCenter" in source or "VOILUTSequence" in source
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        **image_result_identity(source, model, "GSPS"),
        content_label=CONTENT_LABEL,
        content_description=describe("GSPS", model),
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        voi_lut_transformations=None if has_voi else [_voi_from_values(source)],
        presentation_lut_transformation=presentation_lut(source),
    )
    gsps.SeriesDescription = describe("GSPS", model)
    # General Series: Laterality is Type 2C, required for a paired body part; with the source's
    # Body Part Examined (a chest is not paired) a reader, dciodvfy included, can tell.
    if source.get("BodyPartExamined"):
        gsps.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality") or not source.get("BodyPartExamined"):
        gsps.Laterality = source.get("Laterality") or ""
    return carry_context(gsps, source)

