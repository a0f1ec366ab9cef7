"""The Structured Report result: a TID 1500 Measurement Report for one projection radiograph.

Content tree (Comprehensive SR, the SR class PACS and viewers support most widely; nothing here
needs 3D coordinates)::

    Imaging Measurement Report (TID 1500)
      Language, Device Observer "Pleura" (model name, manufacturer), Procedure Reported
      Image Library: the source image (when its header allows the TID 1603 descriptors)
      Imaging Measurements
        Measurement Group (TID 1410, planar ROI = the SEG's "Pneumothorax" segment)
          Tracking Identifier / Tracking UID (the same UID as the SEG segment's Tracking UID)
          Finding: Pneumothorax; Finding Category: Morphologically abnormal structure
          Algorithm Identification (TID 4019): model name, version, family AI, manufacturer
          Referenced Segmentation Frame -> the SEG; Source Image For Segmentation -> the image
          Certainty of Finding = classifier probability (UCUM "1")
          Threshold Value = decision threshold (UCUM "1")
          Area (cm2) when the image has a usable pixel spacing; Area ({pixels}) always
          Pneumothorax = Present / Absent  (the decision: present iff the image is flagged)
          Rendering Intent = Presentation Required / Not for Presentation (flagged or not)
      Comment: the model's intended use, led by the synthetic-demo warning for demo models

Present/Absent is the model's final decision (``finding.flagged``: classifier above threshold and a
large enough mask), not the classifier alone; the probability and threshold are both reported so
a reader can see how the decision was reached.
"""

from __future__ import annotations

import pydicom
from highdicom.seg import Segmentation
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegmentationFrame,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForSegmentation,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from training.bundle import ModelIdentity
from worker.inference.result import ImageFinding
from worker.writers.seg import (
    ALGORITHM_FAMILY,
    DEMO_LABEL,
    FINDING_CATEGORY,
    MANUFACTURER,
    PNEUMOTHORAX,
    SEGMENT_NUMBER,
    describe,
    source_header,
    tracking_uid,
)
from worker.writers.uids import device_uid, instance_uid, series_uid

SR_SERIES_NUMBER = 9902
DEVICE_OBSERVER_NAME = "Pleura"

# The classifier's output probability. DCM 111012 "Certainty of Finding" is the concept DICOM's
# CAD SR templates (Mammography and Chest CAD SR) use for an algorithm's confidence that a finding
# it reports is real; here as a fraction 0..1 (UCUM "1") rather than in percent.
PROBABILITY = codes.DCM.CertaintyOfFinding
# The bundle's probability threshold the decision was taken with: DCM 122411 "Threshold Value".
THRESHOLD = codes.DCM.ThresholdValue
AREA = codes.SCT.Area  # SCT 42798000
# The codes of DICOM's Present/Absent context groups (SCT 272519000, not 2667000, for Absent).
PRESENT = codes.SCT.Present  # SCT 52101004
ABSENT = codes.SCT.Absent  # SCT 272519000
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
UNIT_PIXELS = CodedConcept("{pixels}", "UCUM", "pixels")


def build_sr(
    source: pydicom.Dataset,
    finding: ImageFinding,
    seg: Segmentation,
    model: ModelIdentity,
) -> ComprehensiveSR:
    """The TID 1500 report of ``finding`` on ``source``, referencing the pneumothorax segment of ``seg``.

    ``seg`` must be the SEG :func:`worker.writers.seg.build_seg` made from the same source and model.
    """
    header = source_header(source)
    _check_seg_matches(seg, header)

    algorithm = AlgorithmIdentification(
        name=model.name,
        version=model.version,
        family=ALGORITHM_FAMILY,
        manufacturer=model.manufacturer,
    )
    source_of_measurement = [SourceImageForMeasurement.from_source_image(header)]

    def measurement(
        name: Code, value: float, unit: Code | CodedConcept, *, on_image: bool = False
    ) -> Measurement:
        return Measurement(
            name=name,
            value=value,
            unit=unit,
            algorithm_id=algorithm,
            referenced_images=source_of_measurement if on_image else None,
        )

    measurements = [
        measurement(PROBABILITY, float(finding.probability), UNIT_ONE, on_image=True),
        measurement(THRESHOLD, float(finding.threshold), UNIT_ONE),
    ]
    if finding.area_cm2 is not None:
        measurements.append(measurement(AREA, float(finding.area_cm2), UNIT_CM2, on_image=True))
    measurements.append(measurement(AREA, int(finding.area_px), UNIT_PIXELS, on_image=True))

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
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(source, model),
            identifier=_tracking_text(model),
        ),
        referenced_segment=referenced_segment,
        finding_type=PNEUMOTHORAX,
        finding_category=FINDING_CATEGORY,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            QualitativeEvaluation(PNEUMOTHORAX, PRESENT if finding.flagged else ABSENT),
            QualitativeEvaluation(RENDERING_INTENT, FLAGGED if finding.flagged else NOT_FLAGGED),
        ],
    )
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(model),
            name=DEVICE_OBSERVER_NAME,
            manufacturer_name=model.manufacturer,
            model_name=model.name,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group],
        referenced_images=[header] if _has_library_descriptors(header) else None,
    )
    # TID 1500 is an extensible template: a closing comment carries the intended use (and the
    # demo warning) where anyone reading the report's text sees it.
    report[0].ContentSequence.append(
        TextContentItem(
            name=COMMENT,
            value=_intended_use_text(model),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )

    return ComprehensiveSR(
        evidence=[header, seg],
        content=report[0],
        series_instance_uid=series_uid(header.StudyInstanceUID, model, "SR"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid(header.SOPInstanceUID, model, "SR"),
        instance_number=int(seg.InstanceNumber),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        series_description=describe("SR", model),
        is_complete=True,
        is_final=False,  # an algorithm's output, not a radiologist's report
        is_verified=False,
    )


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
