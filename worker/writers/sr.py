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
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegmentationFrame,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForSegmentation,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from contract.bundle import ModelIdentity
from worker.inference.result import ImageFinding
from worker.writers.common import (
    ALGORITHM_FAMILY,
    DEMO_LABEL,
    FINDING_CATEGORY,
    MANUFACTURER,
    PNEUMOTHORAX,
    SERIES_NUMBERS,
    carry_context,
    describe,
    source_header,
    tracking_uid,
)
from worker.writers.seg import SEGMENT_NUMBER
from worker.writers.uids import device_uid, result_uid, series_uid, study_result_uid

DEVICE_OBSERVER_NAME = "Pleura"

# The classifier's output probability. DCM 111012 "Certainty of Finding" is the concept DICOM's
# CAD SR templates (Mammography and Chest CAD SR) use for an algorithm's confidence that a finding
# it reports is real; here as a fraction 0..1 (UCUM "1") rather than in percent.
PROBABILITY = codes.DCM.CertaintyOfFinding
# The bundle's probability threshold the decision was taken with: DCM 122411 "Threshold Value".
THRESHOLD = codes.DCM.ThresholdValue
AREA = codes.SCT.Area  # SCT 42798000
# The largest pleural gap: the pneumothorax's Width (SCT 103355008) with derivation Maximum.
WIDTH = codes.SCT.Width
MAXIMUM = codes.SCT.Maximum  # SCT 56851009
# No standard concept names the share of a hemithorax a finding takes: a local code (the "99"
# prefix marks a private coding scheme, declared in the Coding Scheme Identification Sequence).
PRIVATE_SCHEME = "99PLEURA"
HEMITHORAX_FRACTION = Code("HTXFRACTION", PRIVATE_SCHEME, "Fraction of hemithorax")
PLEURAL_STRUCTURE = codes.SCT.PleuralStructure  # SCT 3120008
LATERALITY = {"right": codes.SCT.Right, "left": codes.SCT.Left, "bilateral": codes.SCT.Bilateral}
# The codes of DICOM's Present/Absent context groups (SCT 272519000, not 2667000, for Absent).
PRESENT = codes.SCT.Present  # SCT 52101004
ABSENT = codes.SCT.Absent  # SCT 272519000
NOT_PERFORMED = codes.SCT.NotPerformed  # SCT 262008008
# "Flagged" in CAD terms: DCM 111056 "Rendering Intent", which CAD SR uses to say whether a
# viewer is expected to show a finding.
RENDERING_INTENT = codes.DCM.RenderingIntent
FLAGGED = codes.DCM.PresentationRequiredRenderingDeviceIsExpectedToPresent  # DCM 111150
NOT_FLAGGED = codes.DCM.NotForPresentationRenderingDeviceExpectedNotToPresent  # DCM 111152
# Procedure Reported (CID 100 is extensible and has no chest radiograph of its own).
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
COMMENT = codes.DCM.Comment  # DCM 121106

UNIT_ONE = codes.UCUM.NoUnits  # "1"
UNIT_CM2 = codes.UCUM.SquareCentimeter  # "cm2"
UNIT_MM = codes.UCUM.Millimeter
UNIT_PERCENT = codes.UCUM.Percent
UNIT_PIXELS = CodedConcept("{pixels}", "UCUM", "pixels")


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
    study_uid: str, sop_instance_uids: Sequence[str], model: ModelIdentity, supersedes: str | None = None
) -> str:
    """The report's SOP Instance UID: the same images and model version give the same report; a
    report that supersedes another (``supersedes``: its SOP Instance UID) is another report."""
    if supersedes is None:
        return study_result_uid(study_uid, sop_instance_uids, model, "SR")
    return study_result_uid(study_uid, sop_instance_uids, model, f"SR superseding {supersedes}")


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

    algorithm = AlgorithmIdentification(
        name=model.name,
        version=model.version,
        family=ALGORITHM_FAMILY,
        manufacturer=model.manufacturer,
    )
    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations] = []
    for image, header in zip(analysed, headers):
        if image.seg is not None:
            groups.append(_finding_group(image, header, algorithm, model))
        else:
            groups.append(_negative_group(image, header, algorithm, model))
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
    report = MeasurementReport(
        observation_context=device_observation_context(model),
        procedure_reported=procedure_reported,
        imaging_measurements=groups,
        referenced_images=library or None,
    )
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
    comments.append(_intended_use_text(model))
    for text in comments:
        report[0].ContentSequence.append(
            TextContentItem(name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
        )

    sop_uids = [str(h.SOPInstanceUID) for h in headers] + [image.sop_instance_uid for image in skipped]
    sr = ComprehensiveSR(
        evidence=headers + skipped_headers + [image.seg for image in analysed if image.seg is not None],
        content=report[0],
        series_instance_uid=series_uid(study_uid, model, "SR"),
        series_number=SERIES_NUMBERS["SR"],
        sop_instance_uid=sr_instance_uid(study_uid, sop_uids, model, supersedes.sop_instance_uid if supersedes else None),
        previous_versions=[supersedes.header] if supersedes is not None and supersedes.header is not None else None,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        series_description=describe("SR", model),
        is_complete=True,
        is_final=False,  # an algorithm's output, not a radiologist's report
        is_verified=False,
    )
    _declare_private_scheme(sr)
    return carry_context(sr, context[0])


def device_observation_context(model: ModelIdentity) -> ObservationContext:
    """The report's observer: the device "Pleura" named by the model."""
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(model),
            name=DEVICE_OBSERVER_NAME,
            manufacturer_name=model.manufacturer,
            model_name=model.name,
        ),
    )
    return ObservationContext(observer_device_context=observer)


def _measurement(
    name: Code, value: float, unit: Code | CodedConcept, algorithm: AlgorithmIdentification,
    source: list[SourceImageForMeasurement] | None = None, derivation: Code | None = None,
) -> Measurement:
    return Measurement(
        name=name, value=value, unit=unit, algorithm_id=algorithm, referenced_images=source, derivation=derivation
    )


def _finding_group(
    image: AnalysedImage, header: pydicom.Dataset, algorithm: AlgorithmIdentification, model: ModelIdentity
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    finding, seg = image.finding, image.seg
    assert seg is not None
    _check_seg_matches(seg, header)
    on_image = [SourceImageForMeasurement.from_source_image(header)]
    measurements = [
        _measurement(PROBABILITY, float(finding.probability), UNIT_ONE, algorithm, on_image),
        _measurement(THRESHOLD, float(finding.threshold), UNIT_ONE, algorithm),
    ]
    if finding.area_cm2 is not None:
        measurements.append(_measurement(AREA, float(finding.area_cm2), UNIT_CM2, algorithm, on_image))
    measurements.append(_measurement(AREA, int(finding.area_px), UNIT_PIXELS, algorithm, on_image))
    if finding.gap_mm is not None:
        measurements.append(_measurement(WIDTH, round(finding.gap_mm, 2), UNIT_MM, algorithm, on_image, MAXIMUM))
    if finding.gap_px is not None:
        measurements.append(_measurement(WIDTH, round(finding.gap_px, 2), UNIT_PIXELS, algorithm, on_image, MAXIMUM))
    if finding.hemithorax_fraction is not None:
        percent = round(100.0 * finding.hemithorax_fraction, 1)
        measurements.append(_measurement(HEMITHORAX_FRACTION, percent, UNIT_PERCENT, algorithm, on_image))

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
    sites = None
    if finding.side is not None:
        sites = [FindingSite(anatomic_location=PLEURAL_STRUCTURE, laterality=LATERALITY[finding.side])]
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid(header, model), identifier=_tracking_text(model)),
        referenced_segment=referenced_segment,
        finding_type=PNEUMOTHORAX,
        finding_category=FINDING_CATEGORY,
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            QualitativeEvaluation(PNEUMOTHORAX, PRESENT),
            QualitativeEvaluation(RENDERING_INTENT, FLAGGED),
        ],
    )


def _negative_group(
    image: AnalysedImage, header: pydicom.Dataset, algorithm: AlgorithmIdentification, model: ModelIdentity
) -> MeasurementsAndQualitativeEvaluations:
    finding = image.finding
    if finding.flagged:
        raise ValueError(f"image {header.SOPInstanceUID} is flagged but has no SEG to reference")
    on_image = [SourceImageForMeasurement.from_source_image(header)]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid(header, model), identifier=_tracking_text(model)),
        finding_type=PNEUMOTHORAX,
        finding_category=FINDING_CATEGORY,
        algorithm_id=algorithm,
        measurements=[
            _measurement(PROBABILITY, float(finding.probability), UNIT_ONE, algorithm, on_image),
            _measurement(THRESHOLD, float(finding.threshold), UNIT_ONE, algorithm),
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(PNEUMOTHORAX, ABSENT),
            QualitativeEvaluation(RENDERING_INTENT, NOT_FLAGGED),
        ],
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
    if finding.flagged and finding.side_assumed:
        comments.append(f"{label}: side from the usual display convention (no Patient Orientation)")
    if finding.flagged:
        comments.append(
            f"{label}: sizes in mm from {finding.spacing_source}"
            if finding.spacing_source
            else f"{label}: no usable pixel spacing; sizes in pixels only"
        )
    return comments


def _declare_private_scheme(sr: pydicom.Dataset) -> None:
    """Declare the private coding scheme of :data:`HEMITHORAX_FRACTION` (SR Document General module)."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "Pleura local codes"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    schemes = list(sr.get("CodingSchemeIdentificationSequence", []))
    if not any(s.CodingSchemeDesignator == PRIVATE_SCHEME for s in schemes):
        schemes.append(item)
    sr.CodingSchemeIdentificationSequence = schemes


def _tracking_text(model: ModelIdentity) -> str:
    text = f"Pneumothorax ({model.name} {model.version})"
    return f"{text} - {DEMO_LABEL}" if model.synthetic_demo else text


def _intended_use_text(model: ModelIdentity) -> str:
    use = f"Model {model.name} {model.version}. Intended use: {model.intended_use}"
    return f"{DEMO_LABEL}. {use}" if model.synthetic_demo else use


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
