"""The Structured Report result: one TID 1500 Measurement Report per analysis of a study.

Every analysis of a study gets a report, positive or negative, and so does a study none of whose
images could be analysed: a PACS never stays silent about a study Pleura received. Content tree
(Comprehensive SR, the SR class PACS and viewers support most widely; nothing here needs 3D
coordinates)::

    Imaging Measurement Report (TID 1500)
      Language, Device Observer "Pleura" (model name, manufacturer), Procedure Reported
      Image Library: the images (when their headers allow the TID 1603 descriptors)
      Imaging Measurements
        per image with a finding: Measurement Group (TID 1410, planar ROI = the SEG's segment)
          Tracking Identifier / UID (the SEG segment's and the GSPS outline's Tracking UID)
          Finding: Pneumothorax; Finding Category: Morphologically abnormal structure
          Finding Site: Pleural structure, Laterality Right / Left / Bilateral
          Algorithm Identification (TID 4019): model name, version, family AI, manufacturer
          Referenced Segmentation Frame -> the SEG; Source Image For Segmentation -> the image
          Certainty of Finding = classifier probability (UCUM "1")
          Threshold Value = decision threshold (UCUM "1")
          Area (cm2) when the image has a usable pixel spacing; Area ({pixels}) always
          Width, derivation Maximum = the largest pleural gap (mm when the spacing is known; pixels)
          Fraction of hemithorax (99PLEURA, %) when the lung fields could be estimated
          Pneumothorax = Present; Rendering Intent = Presentation Required
        per image without a finding: Measurement Group (TID 1501) on the source image
          Certainty of Finding, Threshold Value; Pneumothorax = Absent; Not for Presentation
        per flagged image of a classifier-only bundle (no U-Net, so no SEG): Measurement Group
          (TID 1501) on the source image, Finding Category as above, Certainty of Finding, Threshold
          Value; Pneumothorax = Present; Presentation Required (docs/conformance.md)
        per image not analysed (with a readable header): Measurement Group (TID 1501)
          Pneumothorax = Not performed (SCT 262008008)
      Comment, per analysed image: the decision and its rule ("classifier 0.999 >= threshold 0.500,
        but segmented area 120 px < minimum 262 px"), and for a finding which spacing its mm came from
      Comment, per image not analysed: the reason
      (comments name an image by its place in the report and its Series/Instance Numbers, never
      by a UID or a path)
      Comment: the model's intended use, led by the synthetic-demo warning for demo models

Present/Absent is the model's final decision (``finding.flagged``: classifier above threshold and a
large enough mask), not the classifier alone; the probability and threshold are both reported so
a reader can see how the decision was reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from highdicom.seg import Segmentation
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    MeasurementsAndQualitativeEvaluations,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegmentationFrame,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForSegmentation,
    TrackingIdentifier,
)
from pydicom.sr.coding import Code

from contract.bundle import ModelIdentity
from worker.inference.result import GRADCAM_REGION_LABEL, ImageFinding
from worker.writers.common import (
    FINDING_CATEGORY,
    MANUFACTURER,
    PNEUMOTHORAX,
    SERIES_NUMBERS,
    source_header,
    tracking_uid,
)
from worker.writers.seg import SEGMENT_NUMBER
from worker.writers.sr_content import (
    AREA,
    MAXIMUM,
    NOT_PERFORMED,
    UNIT_CM2,
    UNIT_MM,
    UNIT_PIXELS,
    WIDTH,
    MeasurementGroup,
    certainty,
    comprehensive_sr,
    decision_evaluations,
    finding_sites,
    hemithorax_measurement,
    intended_use_text,
    measurement,
    measurement_report,
    sr_algorithm,
    tracking_text,
)
from worker.writers.uids import result_uid, series_uid, study_result_uid

__all__ = ["AnalysedImage", "PLAIN_CHEST_XRAY", "SkippedImage", "build_sr", "sr_instance_uid"]

# Procedure Reported (CID 100 is extensible and has no chest radiograph of its own).
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")


@dataclass(frozen=True)
class AnalysedImage:
    """An image the models ran on: its dataset (header enough), the finding, and the SEG made
    from it when the image is flagged."""

    source: pydicom.Dataset
    finding: ImageFinding
    seg: Segmentation | None = None


@dataclass(frozen=True)
class SkippedImage:
    """An image of the study that was not analysed, with the reason; ``source`` is its header
    when it could be read."""

    sop_instance_uid: str
    reason: str
    source: pydicom.Dataset | None = None


def sr_instance_uid(
    study_uid: str,
    sop_instance_uids: Sequence[str],
    model: ModelIdentity,
    supersedes: str | None = None,
    variant: str | None = None,
) -> str:
    """The report's SOP Instance UID: the same images and model version give the same report; a
    report that supersedes another (``supersedes``: its SOP Instance UID) is another report, and so
    is a report of another ``variant`` of the same images (one written without running the
    networks because the analysis crashed)."""
    kind = "SR" if supersedes is None else f"SR superseding {supersedes}"
    if variant:
        kind = f"{kind} {variant}"
    return study_result_uid(study_uid, sop_instance_uids, model, kind)


@dataclass(frozen=True)
class SupersededReport:
    """The earlier report of the study that a re-analysis replaces: named in the new report's
    Predecessor Documents Sequence (when its header could be read) and in a comment."""

    sop_instance_uid: str
    sop_class_uid: str
    model_name: str | None = None
    model_version: str | None = None
    header: pydicom.Dataset | None = None

    def text(self) -> str:
        model = " ".join(part for part in (self.model_name, self.model_version) if part) or "an earlier model"
        return (
            f"This report supersedes the earlier Pleura report of this study (made by {model}): "
            "the earlier report is no longer current."
        )


def build_sr(
    analysed: Sequence[AnalysedImage],
    skipped: Sequence[SkippedImage],
    model: ModelIdentity,
    procedure_reported: Code = PLAIN_CHEST_XRAY,
    supersedes: SupersededReport | None = None,
    variant: str | None = None,
) -> ComprehensiveSR:
    """The TID 1500 report of one analysis of a study (``procedure_reported``: the CT path's
    report of a series it could not analyse says "CT of chest").

    ``analysed`` holds each image the models ran on (with its SEG when flagged, which the report
    then references), ``skipped`` each image of the analysis that was not analysed and why.
    Raises ValueError when no image has a readable header (there is no patient or study to
    report on), when the images belong to different studies, or a SEG was not made from its image.
    """
    headers = [source_header(image.source) for image in analysed]
    skipped_headers = [source_header(image.source) for image in skipped if image.source is not None]
    context = (headers + skipped_headers)[:1]
    if not context:
        raise ValueError("cannot write a report: no image of the analysis has a readable header")
    study_uid = str(context[0].StudyInstanceUID)
    for header in headers + skipped_headers:
        if str(header.StudyInstanceUID) != study_uid:
            raise ValueError("the images of one report must belong to one study")

    algorithm = sr_algorithm(model)
    groups: list[MeasurementGroup] = []
    for image, header in zip(analysed, headers):
        if image.seg is not None:
            groups.append(_finding_group(image, header, algorithm, model))
        else:
            groups.append(_image_group(image, header, algorithm, model))
    for header in skipped_headers:
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=result_uid(header.SOPInstanceUID, model.name, model.version, "NOT-ANALYSED"),
                    identifier="Not analysed",
                ),
                finding_type=PNEUMOTHORAX,
                algorithm_id=algorithm,
                qualitative_evaluations=[QualitativeEvaluation(PNEUMOTHORAX, NOT_PERFORMED)],
                source_images=[SourceImageForMeasurementGroup.from_source_image(header)],
            )
        )

    library = [header for header in headers + skipped_headers if _has_library_descriptors(header)]
    # TID 1500 is an extensible template: comments carry what the codes cannot say, where anyone
    # reading the report's text sees it: why an image was not analysed, and the intended use (led
    # by the demo warning).
    # Images are named by their place in the report and their Series/Instance Numbers: free text
    # carries no UID and no path (the coded groups reference each image by its UIDs).
    comments = []
    for number, (image, header) in enumerate(zip(analysed, headers), start=1):
        comments.extend(_analysed_comments(f"Image {number}{_numbers(header)}", image.finding))
    for number, image in enumerate(skipped, start=len(analysed) + 1):
        numbers = _numbers(image.source) if image.source is not None else " (header unreadable)"
        comments.append(f"Image {number}{numbers} not analysed: {image.reason}")
    if supersedes is not None:
        comments.insert(0, supersedes.text())
    if model.components:
        comments.append("Composed model: " + "; ".join(model.components))
    comments.append(intended_use_text(model))
    report = measurement_report(model, procedure_reported, groups, comments, library or None)

    sop_uids = [str(h.SOPInstanceUID) for h in headers] + [image.sop_instance_uid for image in skipped]
    identity = {
        "series_instance_uid": series_uid(study_uid, model, "SR"),
        "series_number": SERIES_NUMBERS["SR"],
        "sop_instance_uid": sr_instance_uid(
            study_uid, sop_uids, model, supersedes.sop_instance_uid if supersedes else None, variant
        ),
        "previous_versions": [supersedes.header] if supersedes is not None and supersedes.header is not None else None,
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": model.name,
        "software_versions": model.version,
    }
    evidence = headers + skipped_headers + [image.seg for image in analysed if image.seg is not None]
    return comprehensive_sr(report, evidence, identity, model, context[0])


def _finding_group(
    image: AnalysedImage, header: pydicom.Dataset, algorithm: AlgorithmIdentification, model: ModelIdentity
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    finding, seg = image.finding, image.seg
    assert seg is not None
    _check_seg_matches(seg, header)
    on_image = [SourceImageForMeasurement.from_source_image(header)]
    measurements = certainty(float(finding.probability), float(finding.threshold), algorithm, on_image)
    if finding.area_cm2 is not None:
        measurements.append(measurement(AREA, float(finding.area_cm2), UNIT_CM2, algorithm, on_image))
    measurements.append(measurement(AREA, int(finding.area_px), UNIT_PIXELS, algorithm, on_image))
    if finding.gap_mm is not None:
        measurements.append(measurement(WIDTH, round(finding.gap_mm, 2), UNIT_MM, algorithm, on_image, MAXIMUM))
    if finding.gap_px is not None:
        measurements.append(measurement(WIDTH, round(finding.gap_px, 2), UNIT_PIXELS, algorithm, on_image, MAXIMUM))
    if finding.hemithorax_fraction is not None:
        measurements.append(hemithorax_measurement(finding.hemithorax_fraction, algorithm, on_image))

    referenced_segment = ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        frame_number=_segment_frame_number(seg),
        segment_number=SEGMENT_NUMBER,
        source_image=SourceImageForSegmentation(header.SOPClassUID, header.SOPInstanceUID),
    )
    # The SOP Instance Reference macro forbids Referenced Segment Number next to Referenced Frame
    # Number (the frame already names its segment); highdicom writes both, dciodvfy rejects that.
    del referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid(header, model), identifier=tracking_text(model)),
        referenced_segment=referenced_segment,
        finding_type=PNEUMOTHORAX,
        finding_category=FINDING_CATEGORY,
        finding_sites=finding_sites(finding.side),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=decision_evaluations(True),
    )


def _image_group(
    image: AnalysedImage, header: pydicom.Dataset, algorithm: AlgorithmIdentification, model: ModelIdentity
) -> MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of an image without a SEG: no finding, or a classifier-only bundle's
    finding (Present, on the whole image: there is no segmentation to point at)."""
    finding = image.finding
    if finding.flagged and not finding.is_gradcam_region:
        raise ValueError(f"image {header.SOPInstanceUID} is flagged but has no SEG to reference")
    on_image = [SourceImageForMeasurement.from_source_image(header)]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid(header, model), identifier=tracking_text(model)),
        finding_type=PNEUMOTHORAX,
        finding_category=FINDING_CATEGORY,
        algorithm_id=algorithm,
        measurements=certainty(float(finding.probability), float(finding.threshold), algorithm, on_image),
        qualitative_evaluations=decision_evaluations(bool(finding.flagged)),
        source_images=[SourceImageForMeasurementGroup.from_source_image(header)],
    )


def _numbers(header: pydicom.Dataset) -> str:
    """" (series 2, instance 1)" from the header's Series and Instance Numbers, as far as it has them."""
    parts = [
        f"{name} {header.get(keyword)}"
        for name, keyword in (("series", "SeriesNumber"), ("instance", "InstanceNumber"))
        if header.get(keyword) not in (None, "")
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _analysed_comments(label: str, finding: ImageFinding) -> list[str]:
    """The decision with its rule, and how sizes were measured, for one analysed image."""
    decision = "Present" if finding.flagged else "Absent"
    comments = [f"{label}: {decision}: {finding.decision}" if finding.decision else f"{label}: {decision}"]
    if finding.flagged and finding.is_gradcam_region:
        comments.append(
            f"{label}: classifier-only model, no segmentation and no sizes; the presentation state and "
            f"secondary capture show the {GRADCAM_REGION_LABEL}"
        )
        return comments
    if finding.flagged and finding.side_assumed:
        comments.append(f"{label}: side from the usual display convention (no Patient Orientation)")
    if finding.flagged and finding.hemithorax_fraction is not None and finding.lung_fields_method:
        comments.append(f"{label}: share of the hemithorax measured on {finding.lung_fields_method}")
    if finding.flagged:
        comments.append(
            f"{label}: sizes in mm from {finding.spacing_source}"
            if finding.spacing_source
            else f"{label}: no usable pixel spacing; sizes in pixels only"
        )
    return comments


def _segment_frame_number(seg: Segmentation) -> int:
    """The (1-based) frame of the SEG that holds the pneumothorax segment.

    highdicom puts the Segment Identification in the shared functional groups when all frames
    belong to one segment, else in each frame's.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    frames = [shared] if "SegmentIdentificationSequence" in shared else seg.PerFrameFunctionalGroupsSequence
    for index, frame in enumerate(frames, start=1):
        if int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == SEGMENT_NUMBER:
            return index
    raise ValueError(f"SEG {seg.SOPInstanceUID} has no frame for segment {SEGMENT_NUMBER}")


def _check_seg_matches(seg: Segmentation, header: pydicom.Dataset) -> None:
    if seg.StudyInstanceUID != header.StudyInstanceUID:
        raise ValueError("the SEG belongs to another study than the source image")
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedInstanceSequence", [])
    }
    if referenced and header.SOPInstanceUID not in referenced:
        raise ValueError("the SEG was not made from this source image")


def _has_library_descriptors(header: pydicom.Dataset) -> bool:
    """Whether highdicom can describe the image in the Image Library (TID 1603 wants both)."""
    orientation = header.get("PatientOrientation")
    return "ImagerPixelSpacing" in header and orientation is not None and len(orientation) == 2
