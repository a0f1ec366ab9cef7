"""What the radiograph and the CT Structured Reports share: the codes and units, the device
observer, the measurements every finding reports (certainty, threshold, hemithorax fraction), the
Present/Absent evaluations, the comments, and the finished Comprehensive SR object.

The reports themselves are built by :mod:`worker.writers.sr` (one per analysis of a study) and
:mod:`worker.writers.sr_ct` (one per CT series).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pydicom
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
    RelationshipTypeValues,
    SourceImageForMeasurement,
    TextContentItem,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from contract.bundle import ModelIdentity
from worker.writers.common import ALGORITHM_FAMILY, DEMO_LABEL, MANUFACTURER, PNEUMOTHORAX, carry_context, describe
from worker.writers.uids import device_uid

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
COMMENT = codes.DCM.Comment  # DCM 121106

UNIT_ONE = codes.UCUM.NoUnits  # "1"
UNIT_CM2 = codes.UCUM.SquareCentimeter  # "cm2"
UNIT_MM = codes.UCUM.Millimeter
UNIT_PERCENT = codes.UCUM.Percent
UNIT_PIXELS = CodedConcept("{pixels}", "UCUM", "pixels")

MeasurementGroup = (
    PlanarROIMeasurementsAndQualitativeEvaluations
    | VolumetricROIMeasurementsAndQualitativeEvaluations
    | MeasurementsAndQualitativeEvaluations
)


def sr_algorithm(model: ModelIdentity) -> AlgorithmIdentification:
    """Algorithm Identification (TID 4019): model name, version, family AI, manufacturer; for a
    composed bundle, one Algorithm Parameters item per network ("classifier NAME VERSION")."""
    return AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=list(model.components) or None,
        family=ALGORITHM_FAMILY,
        manufacturer=model.manufacturer,
    )


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


def measurement(
    name: Code, value: float, unit: Code | CodedConcept, algorithm: AlgorithmIdentification,
    source: list[SourceImageForMeasurement] | None = None, derivation: Code | None = None,
) -> Measurement:
    return Measurement(
        name=name, value=value, unit=unit, algorithm_id=algorithm, referenced_images=source, derivation=derivation
    )


def certainty(
    probability: float, threshold: float, algorithm: AlgorithmIdentification,
    on_image: list[SourceImageForMeasurement] | None = None,
) -> list[Measurement]:
    """Certainty of Finding (the probability, on the image when there is one) and Threshold Value."""
    return [
        measurement(PROBABILITY, probability, UNIT_ONE, algorithm, on_image),
        measurement(THRESHOLD, threshold, UNIT_ONE, algorithm),
    ]


def hemithorax_measurement(
    fraction: float, algorithm: AlgorithmIdentification, on_image: list[SourceImageForMeasurement] | None = None
) -> Measurement:
    """The share of the hemithorax a finding takes, in percent (:data:`HEMITHORAX_FRACTION`)."""
    return measurement(HEMITHORAX_FRACTION, round(100.0 * fraction, 1), UNIT_PERCENT, algorithm, on_image)


def finding_sites(side: str | None) -> list[FindingSite] | None:
    """Pleural structure with the finding's laterality; None when the side is unknown."""
    if side is None:
        return None
    return [FindingSite(anatomic_location=PLEURAL_STRUCTURE, laterality=LATERALITY[side])]


def decision_evaluations(flagged: bool) -> list[QualitativeEvaluation]:
    """Pneumothorax = Present and Presentation Required, or Absent and Not for Presentation."""
    return [
        QualitativeEvaluation(PNEUMOTHORAX, PRESENT if flagged else ABSENT),
        QualitativeEvaluation(RENDERING_INTENT, FLAGGED if flagged else NOT_FLAGGED),
    ]


def tracking_text(model: ModelIdentity) -> str:
    text = f"Pneumothorax ({model.name} {model.version})"
    return f"{text} - {DEMO_LABEL}" if model.synthetic_demo else text


def intended_use_text(model: ModelIdentity) -> str:
    use = f"Model {model.name} {model.version}. Intended use: {model.intended_use}"
    return f"{DEMO_LABEL}. {use}" if model.synthetic_demo else use


def measurement_report(
    model: ModelIdentity,
    procedure_reported: Code,
    groups: Sequence[MeasurementGroup],
    comments: Iterable[str],
    referenced_images: Sequence[pydicom.Dataset] | None = None,
) -> MeasurementReport:
    """The TID 1500 report observed by the device "Pleura", with ``comments`` after the
    measurements (TID 1500 is extensible: they carry what the codes cannot say)."""
    report = MeasurementReport(
        observation_context=device_observation_context(model),
        procedure_reported=procedure_reported,
        imaging_measurements=groups,
        referenced_images=referenced_images,
    )
    for text in comments:
        report[0].ContentSequence.append(
            TextContentItem(name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
        )
    return report


def comprehensive_sr(
    report: MeasurementReport,
    evidence: Sequence[pydicom.Dataset],
    identity: dict[str, Any],
    model: ModelIdentity,
    context: pydicom.Dataset,
) -> ComprehensiveSR:
    """The Comprehensive SR of ``report`` (``identity``: its series and instance UIDs, numbers and
    equipment), with the private coding scheme declared and the source's ``context`` carried."""
    sr = ComprehensiveSR(
        evidence=evidence,
        content=report[0],
        **identity,
        series_description=describe("SR", model),
        is_complete=True,
        is_final=False,  # an algorithm's output, not a radiologist's report
        is_verified=False,
    )
    declare_private_scheme(sr)
    return carry_context(sr, context)


def declare_private_scheme(sr: pydicom.Dataset) -> None:
    """Declare the private coding scheme of :data:`HEMITHORAX_FRACTION` (SR Document General module)."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "Pleura local codes"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    schemes = list(sr.get("CodingSchemeIdentificationSequence", []))
    if not any(s.CodingSchemeDesignator == PRIVATE_SCHEME for s in schemes):
        schemes.append(item)
    sr.CodingSchemeIdentificationSequence = schemes
